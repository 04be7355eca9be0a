"""The embedded default benchmark: a generated multi-label image dataset with COCO-like label structure.

Every image draws a latent scene (with probability ``scene_mix_prob`` a mixture of two). A scene sets a
per-class inclusion probability, so labels co-occur through a few scene types (a low-rank dependence, as in
COCO where "kitchen" brings oven, sink and bowl); class frequencies follow a Zipf-like long tail whose sum is
``mean_labels``. Each positive class is then drawn as one object:

* a class is a distinct glyph (disk, star, letter T, ...) filled with a class-specific texture (stripes,
  checker, dots, concentric rings or plain) in the object's own frame, so rotating the object rotates its
  texture;
* objects vary in position, scale, rotation (up to ``max_rotation``, as photographed objects are mostly
  upright) and colour (each class has a typical hue, jittered by ``hue_jitter``, as real objects have
  typical colours), overlap each other up to ``max_overlap``, and are drawn over distractor shapes
  (irregular blobs and scribbles that are no class) and under a few more;
* the background has a scene-dependent colour and stripe texture (a context cue, as a real scene is), plus a
  smooth random field and Gaussian pixel noise.

The defaults are tuned for the CPU study: a 4-layer CNN (16-32-64-128 channels, stride 2, BN, ReLU, global
average pooling) trains at about 7000 images/s on 2 CPU cores at 32 px against about 3000 at 64 px, and after 8
epochs (about 5 s) reaches a test mAP of about 60 with full labels against about 47 with 40% of the
positives and 43 with a single positive per image (BCE, assume-negative). At 32 px every glyph is still
recognisable by eye; at 64 px the same budget gives a lower full-label mAP (about 53 with 2000 images).

Generation is deterministic for a config: the scene-class structure comes from ``seed``, and image ``i`` of a
split from its own generator seeded by ``(seed, split, i)``, so a smaller ``n_train`` gives a prefix of a
larger one. :func:`make_synthetic` writes one folder per config under ``data/synthetic`` (images as ``.npy``
arrays that memory-map, labels in ``labels.npz``, and ``meta.json`` with the config and SHA-256 checksums)
and reuses it while config and files match. :func:`load_synthetic` returns the three splits with all labels
known; missing-label protocols are applied by the caller.

Command line::

    python -m clml_core.data.synthetic [--size 32] [--n-train 4000] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from clml_core.paths import DATA_DIR

from .dataset import MultiLabelDataset

# Bumped whenever a change to this module changes the generated pixels or labels; part of the cache key.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings")
_TEMPLATE_SIZE = 64  # glyph masks are stored at this resolution and resampled per object
_SUPERSAMPLE = 2  # sub-pixels per pixel side when drawing an object (anti-aliasing)
_N_DISTRACTOR_TEMPLATES = 24
_TEXTURE_FREQ = (8.0, 14.0)  # radians per unit of the glyph frame: 2.5 to 4.5 texture periods across a glyph


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the generated dataset. Sizes are in pixels unless named a fraction.

    Attributes:
        image_size: Side of the square images.
        n_train, n_val, n_test: Images per split.
        num_classes: Number of classes C, at most ``len(CLASS_NAMES)``; the first C glyphs are used.
        num_scenes: Number of latent scene types.
        seed: Seed of the scene structure and of every image.
        mean_labels: Sum of the target class frequencies, i.e. the mean number of labels per image before
            images with no label or more than ``max_objects`` labels are redrawn.
        zipf_exponent: Class k (0-based) has target frequency proportional to ``(k + 1) ** -zipf_exponent``.
        classes_per_scene: Classes a scene favours; every class is favoured by at least one scene.
        scene_strength: Logit added to a scene's favoured classes and subtracted from the others; larger
            means stronger label co-occurrence structure.
        scene_mix_prob: Probability that an image mixes two scenes (averaging their class probabilities).
        max_objects: Largest number of labels (objects) in one image.
        object_scale: (min, max) object diameter as a fraction of ``image_size``.
        max_overlap: Two objects' centres are at least ``(1 - max_overlap) * (r1 + r2)`` apart, when that can
            be found in a few tries; 0 forbids overlap of the circumscribed disks, 1 allows any overlap.
        max_rotation: Objects are rotated by a uniform angle in [-max_rotation, max_rotation] degrees.
        hue_jitter: An object's hue is its class hue plus a uniform offset in [-hue_jitter, hue_jitter]
            (hues on the unit circle), so 0.5 makes colour carry no class information.
        texture_contrast: Brightness drop of the dark texture tone relative to the object's colour (0 makes
            every class a plain silhouette).
        clutter_rate: Mean (Poisson) number of distractor shapes per image.
        clutter_front_prob: Probability that a distractor is drawn in front of the objects (an occluder).
        clutter_scale: (min, max) distractor diameter as a fraction of ``image_size``.
        background_jitter: Per-image standard deviation of the background colour around its scene's colour.
        background_texture: Amplitude of the scene's stripe texture and of the smooth random field.
        noise_std: Standard deviation of the Gaussian pixel noise, on the [0, 1] intensity scale.
    """

    image_size: int = 32
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 1000
    num_classes: int = 20
    num_scenes: int = 8
    seed: int = 0
    mean_labels: float = 3.0
    zipf_exponent: float = 0.8
    classes_per_scene: int = 5
    scene_strength: float = 3.0
    scene_mix_prob: float = 0.3
    max_objects: int = 6
    object_scale: tuple[float, float] = (0.32, 0.5)
    max_overlap: float = 0.4
    max_rotation: float = 30.0
    hue_jitter: float = 0.08
    texture_contrast: float = 0.55
    clutter_rate: float = 1.5
    clutter_front_prob: float = 0.3
    clutter_scale: tuple[float, float] = (0.1, 0.3)
    background_jitter: float = 0.08
    background_texture: float = 0.12
    noise_std: float = 0.04

    def __post_init__(self) -> None:
        def check(field: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{field} = {getattr(self, field)!r}; expected {expected}")

        check("image_size", self.image_size >= 16, "an int >= 16")
        for split in SPLITS:
            check(f"n_{split}", getattr(self, f"n_{split}") >= 1, "an int >= 1")
        check("num_classes", 1 <= self.num_classes <= len(CLASS_NAMES), f"an int in [1, {len(CLASS_NAMES)}]")
        check("num_scenes", self.num_scenes >= 1, "an int >= 1")
        check("classes_per_scene", 1 <= self.classes_per_scene <= self.num_classes, "an int in [1, num_classes]")
        check("max_objects", 1 <= self.max_objects <= self.num_classes, "an int in [1, num_classes]")
        check("zipf_exponent", self.zipf_exponent >= 0, "a float >= 0")
        check("scene_strength", self.scene_strength >= 0, "a float >= 0")
        check("max_rotation", 0 <= self.max_rotation <= 180, "degrees in [0, 180]")
        check("hue_jitter", 0 <= self.hue_jitter <= 0.5, "a float in [0, 0.5]")
        for field in ("scene_mix_prob", "max_overlap", "texture_contrast", "clutter_front_prob"):
            check(field, 0 <= getattr(self, field) <= 1, "a float in [0, 1]")
        for field in ("clutter_rate", "background_jitter", "background_texture", "noise_std"):
            check(field, getattr(self, field) >= 0, "a float >= 0")
        for field in ("object_scale", "clutter_scale"):
            low, high = getattr(self, field)
            check(field, 0 < low <= high <= 1, "a pair (min, max) with 0 < min <= max <= 1")
        top = _target_frequencies(self)[0]
        check("mean_labels", 0 < top < 1, f"a value giving the most frequent class a frequency < 1 (got {top:.3f})")

    def to_json(self) -> dict:
        """The config as a JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, values: dict) -> SyntheticConfig:
        """Inverse of :meth:`to_json`; unknown or missing fields raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(values) != names:
            raise ValueError(
                f"SyntheticConfig fields differ: unknown {sorted(set(values) - names)}, "
                f"missing {sorted(names - set(values))}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def key(self) -> str:
        """Short stable hash of the config and :data:`GENERATOR_VERSION`, used to name its folder."""
        blob = json.dumps({"version": GENERATOR_VERSION, "config": self.to_json()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------- labels


def _target_frequencies(config: SyntheticConfig) -> np.ndarray:
    """(C,) Zipf-like target class frequencies summing to ``mean_labels``, most frequent first."""
    weights = (np.arange(config.num_classes) + 1.0) ** -config.zipf_exponent
    return config.mean_labels * weights / weights.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def scene_class_probabilities(config: SyntheticConfig) -> np.ndarray:
    """Per-scene class inclusion probabilities, calibrated to the Zipf target frequencies.

    Scene s favours ``classes_per_scene`` classes (logit ``+scene_strength``, the others
    ``-scene_strength``, plus N(0, 0.5) noise). A per-class offset b_c is found by bisection so that the
    marginal frequency under uniform scenes, mean_s sigmoid(b_c + A[s, c]), equals the target. Mixing two
    scenes by averaging their probabilities leaves this marginal unchanged.

    Returns:
        (S, C) float64 probabilities.
    """
    rng = np.random.default_rng([config.seed, 1000])
    s, c = config.num_scenes, config.num_classes
    favoured = np.zeros((s, c), dtype=bool)
    favoured[np.arange(c) % s, np.arange(c)] = True  # every class has a scene
    for scene in range(s):
        extra = config.classes_per_scene - int(favoured[scene].sum())
        if extra > 0:
            favoured[scene, rng.choice(np.flatnonzero(~favoured[scene]), size=extra, replace=False)] = True
    affinity = np.where(favoured, config.scene_strength, -config.scene_strength) + rng.normal(0, 0.5, (s, c))
    target = _target_frequencies(config)
    low, high = np.full(c, -30.0), np.full(c, 30.0)
    for _ in range(80):  # bisection on the monotone marginal; 60 / 2**80 is far below float64 resolution
        mid = (low + high) / 2
        too_high = _sigmoid(mid + affinity).mean(axis=0) > target
        high = np.where(too_high, mid, high)
        low = np.where(too_high, low, mid)
    return _sigmoid((low + high) / 2 + affinity)


def _draw_labels(
    probs: np.ndarray, config: SyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image's labels: draw (a mixture of) scenes, then classes, redrawn until 1..max_objects positives.

    Returns:
        (C,) uint8 labels and the two scene ids (the second is -1 for a single scene).
    """
    while True:
        first = int(rng.integers(config.num_scenes))
        second = int(rng.integers(config.num_scenes)) if rng.random() < config.scene_mix_prob else -1
        p = probs[first] if second < 0 else (probs[first] + probs[second]) / 2
        labels = (rng.random(config.num_classes) < p).astype(np.uint8)
        if 1 <= labels.sum() <= config.max_objects:
            return labels, (first, second)


def label_statistics(labels: np.ndarray, top_k: int = 8) -> dict:
    """Summary of a label matrix: cardinality, class imbalance and co-occurrence structure.

    The normalised co-occurrence matrix is M[j, k] = n_jk / sqrt(n_j n_k), with n_jk the number of images
    holding both labels and n_j = n_jj (the cosine similarity of label columns; rows and columns of classes
    with no positive are 0). M is symmetric positive semi-definite with trace = number of non-empty classes,
    so its singular values sum to that number; a few large ones mean low-rank label dependence (independent
    labels give values near 1 for every class plus the frequency mode).

    Args:
        labels: (N, C) 0/1 matrix.
        top_k: Number of leading singular values reported.

    Returns:
        dict with ``n_images``, ``num_classes``, ``labels_per_image_mean``, ``labels_per_image_hist`` (counts
        of images with 0, 1, ..., max labels), ``class_frequency`` (C fractions), ``class_frequency_max``,
        ``class_frequency_min``, ``imbalance_ratio`` (max / min frequency; ``inf`` when a class has no
        positive), ``cooccurrence_singular_values`` (top_k, descending) and ``cooccurrence_top_k_share``
        (their share of the sum of all singular values).
    """
    y = np.asarray(labels)
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"labels must be a non-empty (N, C) matrix, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must contain only 0 and 1")
    y = y.astype(np.float64)
    n, c = y.shape
    per_image = y.sum(axis=1).astype(np.int64)
    freq = y.mean(axis=0)
    counts = y.T @ y  # (C, C) co-occurrence counts
    diag = np.sqrt(np.diag(counts))
    scale = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    normalised = counts * scale[:, None] * scale[None, :]
    singular = np.linalg.svd(normalised, compute_uv=False)  # descending
    total = singular.sum()
    return {
        "n_images": n,
        "num_classes": c,
        "labels_per_image_mean": float(per_image.mean()),
        "labels_per_image_hist": np.bincount(per_image).tolist(),
        "class_frequency": freq.tolist(),
        "class_frequency_max": float(freq.max()),
        "class_frequency_min": float(freq.min()),
        "imbalance_ratio": float(freq.max() / freq.min()) if freq.min() > 0 else float("inf"),
        "cooccurrence_singular_values": singular[:top_k].tolist(),
        "cooccurrence_top_k_share": float(singular[:top_k].sum() / total) if total > 0 else 0.0,
    }


# ----------------------------------------------------------------------------------------------- glyphs


def _regular(n: int, radius: float, phase: float = np.pi / 2) -> list[tuple[float, float]]:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return [(radius * np.cos(a), -radius * np.sin(a)) for a in angles]


def _star(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return [(r * np.cos(a), -r * np.sin(a)) for r, a in zip(radii, angles)]


# Glyphs in [-1, 1]^2 (y down) as drawing commands (kind, geometry, ink): ink 1 paints, 0 cuts out.
_GLYPHS: dict[str, list[tuple[str, object, int]]] = {
    "disk": [("ellipse", (-0.85, -0.85, 0.85, 0.85), 1)],
    "square": [("rect", (-0.75, -0.75, 0.75, 0.75), 1)],
    "triangle": [("polygon", _regular(3, 0.98), 1)],
    "ring": [("ellipse", (-0.95, -0.95, 0.95, 0.95), 1), ("ellipse", (-0.5, -0.5, 0.5, 0.5), 0)],
    "cross": [("rect", (-0.28, -0.95, 0.28, 0.95), 1), ("rect", (-0.95, -0.28, 0.95, 0.28), 1)],
    "star": [("polygon", _star(5, 0.98, 0.42), 1)],
    "crescent": [("ellipse", (-0.9, -0.9, 0.9, 0.9), 1), ("ellipse", (-0.35, -0.95, 1.2, 0.6), 0)],
    "heart": [
        ("ellipse", (-0.9, -0.75, 0.05, 0.2), 1),
        ("ellipse", (-0.05, -0.75, 0.9, 0.2), 1),
        ("polygon", [(-0.86, -0.1), (0.86, -0.1), (0.0, 0.9)], 1),
    ],
    "arrow": [("polygon", [(-0.95, -0.2), (0.1, -0.2), (0.1, -0.6), (0.95, 0.0), (0.1, 0.6), (0.1, 0.2)], 1)],
    "letter_t": [("rect", (-0.85, -0.9, 0.85, -0.5), 1), ("rect", (-0.22, -0.9, 0.22, 0.9), 1)],
    "letter_l": [("rect", (-0.7, -0.9, -0.28, 0.9), 1), ("rect", (-0.7, 0.5, 0.75, 0.9), 1)],
    "letter_h": [
        ("rect", (-0.8, -0.9, -0.4, 0.9), 1),
        ("rect", (0.4, -0.9, 0.8, 0.9), 1),
        ("rect", (-0.8, -0.2, 0.8, 0.2), 1),
    ],
    "letter_e": [
        ("rect", (-0.7, -0.9, -0.32, 0.9), 1),
        ("rect", (-0.7, -0.9, 0.75, -0.58), 1),
        ("rect", (-0.7, -0.16, 0.55, 0.16), 1),
        ("rect", (-0.7, 0.58, 0.75, 0.9), 1),
    ],
    "bar": [("rect", (-0.95, -0.26, 0.95, 0.26), 1)],
    "half_disk": [("pieslice", (-0.95, -0.7, 0.95, 1.2), 1)],
    "frame": [("rect", (-0.85, -0.85, 0.85, 0.85), 1), ("rect", (-0.45, -0.45, 0.45, 0.45), 0)],
    "dumbbell": [
        ("rect", (-0.6, -0.14, 0.6, 0.14), 1),
        ("ellipse", (-0.98, -0.4, -0.2, 0.4), 1),
        ("ellipse", (0.2, -0.4, 0.98, 0.4), 1),
    ],
    "chevron": [("polygon", [(-0.9, -0.75), (0.0, 0.1), (0.9, -0.75), (0.9, -0.1), (0.0, 0.8), (-0.9, -0.1)], 1)],
    "bowtie": [("polygon", [(-0.9, -0.8), (0.9, 0.8), (0.9, -0.8), (-0.9, 0.8)], 1)],
    "triad": [
        ("ellipse", (x - 0.36, y - 0.36, x + 0.36, y + 0.36), 1) for x, y in [(0.0, -0.56), (-0.56, 0.42), (0.56, 0.42)]
    ],
}
CLASS_NAMES = tuple(_GLYPHS)  # class k is drawn as glyph k


def _render_mask(
    commands: list[tuple[str, object, int]], size: int = _TEMPLATE_SIZE, oversample: int = 4
) -> np.ndarray:
    """Rasterise drawing commands in [-1, 1]^2 into an anti-aliased (size, size) float32 mask in [0, 1].

    Kinds: ``rect`` / ``ellipse`` / ``pieslice`` (lower half of the ellipse) take a box (x0, y0, x1, y1);
    ``polygon`` and ``line`` (a thick polyline) take a list of (x, y) points.
    """
    big = size * oversample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)

    def px(points) -> list[float]:
        return [(v + 1) / 2 * (big - 1) for point in points for v in point]

    for kind, geometry, ink in commands:
        fill = 255 * ink
        if kind == "polygon":
            draw.polygon(px(geometry), fill=fill)
        elif kind == "line":
            draw.line(px(geometry), fill=fill, width=big * 5 // 32, joint="curve")
        else:
            x0, y0, x1, y1 = geometry
            box = px([(x0, y0), (x1, y1)])
            if kind == "rect":
                draw.rectangle(box, fill=fill)
            elif kind == "ellipse":
                draw.ellipse(box, fill=fill)
            elif kind == "pieslice":
                draw.pieslice(box, 180, 360, fill=fill)
            else:
                raise ValueError(f"unknown drawing command {kind!r}")
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def class_template(name: str) -> np.ndarray:
    """Alpha mask of one class glyph.

    Returns:
        (T, T) float32 in [0, 1], T = 64, covering [-1, 1]^2 of the object's frame.
    """
    if name not in _GLYPHS:
        raise ValueError(f"unknown class glyph {name!r}; expected one of {CLASS_NAMES}")
    return _render_mask(_GLYPHS[name])


def _distractor_templates(seed: int) -> np.ndarray:
    """(K, T, T) masks of shapes that are no class: irregular blobs and thick scribbles, alternating."""
    rng = np.random.default_rng([seed, 2000])
    phi = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    masks = []
    for k in range(_N_DISTRACTOR_TEMPLATES):
        if k % 2 == 0:
            # A star-shaped blob: radius 0.62 plus random 2-, 3- and 5-fold harmonics.
            radius = 0.62 + sum(rng.uniform(0.08, 0.2) * np.cos(j * phi + rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5))
            radius = np.clip(radius, 0.15, 0.98)
            command = ("polygon", list(zip(radius * np.cos(phi), radius * np.sin(phi))), 1)
        else:
            command = ("line", rng.uniform(-0.8, 0.8, size=(int(rng.integers(3, 6)), 2)).tolist(), 1)
        masks.append(_render_mask([command]))
    return np.stack(masks)


# ----------------------------------------------------------------------------------------------- drawing


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Texture value in [0, 1] (1 = bright tone) at object-frame coordinates u, v in [-1, 1]."""
    if kind == "solid":
        return np.ones_like(u)
    if kind == "stripes":
        return (np.sin(freq * u) > 0).astype(np.float32)
    if kind == "checker":
        return (np.sin(freq * u) * np.sin(freq * v) > 0).astype(np.float32)
    if kind == "dots":
        return ((np.cos(freq * u) + np.cos(freq * v)) < 0.6).astype(np.float32)
    if kind == "rings":
        return (np.sin(freq * np.hypot(u, v)) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}")


def _sample_bilinear(template: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a (T, T) template at frame coordinates (u, v) in [-1, 1] (x, y); 0 outside."""
    t = template.shape[0]
    x = (u + 1) / 2 * (t - 1)
    y = (v + 1) / 2 * (t - 1)
    inside = (x >= 0) & (x <= t - 1) & (y >= 0) & (y <= t - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, t - 2)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, t - 2)
    fx, fy = x - x0, y - y0
    top = template[y0, x0] * (1 - fx) + template[y0, x0 + 1] * fx
    bottom = template[y0 + 1, x0] * (1 - fx) + template[y0 + 1, x0 + 1] * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, 0.0)


def _paste(
    image: np.ndarray,
    template: np.ndarray,
    centre: tuple[float, float],
    diameter: float,
    angle: float,
    colour: np.ndarray,
    texture: str,
    texture_freq: float,
    contrast: float,
) -> None:
    """Alpha-composite one textured, rotated glyph onto ``image`` (H, W, 3) float32 in place.

    The template's [-1, 1]^2 maps to a square of side ``diameter`` centred at ``centre`` (x, y in pixels,
    pixel k covering [k, k + 1)), rotated by ``angle`` radians; each pixel averages _SUPERSAMPLE^2 samples.
    """
    h, w = image.shape[:2]
    cx, cy = centre
    half = diameter / 2
    reach = half * np.sqrt(2)
    x0, x1 = max(0, int(np.floor(cx - reach))), min(w, int(np.ceil(cx + reach)))
    y0, y1 = max(0, int(np.floor(cy - reach))), min(h, int(np.ceil(cy + reach)))
    if x0 >= x1 or y0 >= y1:
        return
    ss, ph, pw = _SUPERSAMPLE, y1 - y0, x1 - x0
    xs = x0 + (np.arange(pw * ss) + 0.5) / ss - cx
    ys = y0 + (np.arange(ph * ss) + 0.5) / ss - cy
    dx, dy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))  # (ph * ss, pw * ss)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / half
    v = (-sin * dx + cos * dy) / half
    alpha = _sample_bilinear(template, u, v)
    shade = 1 - contrast * (1 - _texture(texture, u, v, texture_freq))
    # Average the ss x ss sub-pixels: (ph * ss, pw * ss) -> (ph, pw).
    a = alpha.reshape(ph, ss, pw, ss).mean(axis=(1, 3))
    a_shade = (alpha * shade).reshape(ph, ss, pw, ss).mean(axis=(1, 3))
    patch = image[y0:y1, x0:x1]
    patch *= 1 - a[..., None]
    patch += a_shade[..., None] * colour[None, None, :]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) as a (3,) float32 RGB array."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


class _Renderer:
    """Draws images for one config: holds templates, scene backgrounds and the pixel grid."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.templates = np.stack([class_template(name) for name in CLASS_NAMES[: config.num_classes]])
        self.class_textures = [TEXTURES[k % len(TEXTURES)] for k in range(config.num_classes)]
        self.distractors = _distractor_templates(config.seed)
        rng = np.random.default_rng([config.seed, 3000])
        self.class_hues = rng.permutation(config.num_classes) / config.num_classes
        s = config.num_scenes
        hues = (np.arange(s) / s + rng.uniform(0, 1 / s, s)) % 1
        self.scene_colour = np.stack(
            [_hsv_to_rgb(hue, rng.uniform(0.15, 0.45), rng.uniform(0.35, 0.7)) for hue in hues]
        )  # (S, 3)
        self.scene_angle = rng.uniform(0, np.pi, s)
        self.scene_freq = rng.uniform(0.15, 0.6, s)  # radians per pixel at 64 px
        n = config.image_size
        coords = (np.arange(n, dtype=np.float32) + 0.5) * (64.0 / n)  # scene textures scale with the image
        self.grid_x, self.grid_y = np.meshgrid(coords, coords)
        # Linear interpolation from a 5 x 5 random grid to n x n: field = M @ G @ M.T.
        self.smooth = np.clip(1 - np.abs(np.linspace(0, 4, n)[:, None] - np.arange(5)[None, :]), 0, 1)

    def background(self, scene: int, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        angle = self.scene_angle[scene] + rng.normal(0, 0.25)
        wave = np.sin(
            self.scene_freq[scene] * (np.cos(angle) * self.grid_x + np.sin(angle) * self.grid_y)
            + rng.uniform(0, 2 * np.pi)
        )
        field = (self.smooth @ rng.normal(0, 1, (3, 5, 5)) @ self.smooth.T).transpose(1, 2, 0)  # (n, n, 3)
        colour = self.scene_colour[scene] + rng.normal(0, cfg.background_jitter, 3)
        shade = 1 + cfg.background_texture * wave[..., None]
        return (colour[None, None, :] * shade + cfg.background_texture * 0.5 * field).astype(np.float32)

    def _random_colour(self, rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
        hue = rng.uniform() if hue is None else hue % 1.0
        return _hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))

    def _distractor(self, image: np.ndarray, rng: np.random.Generator) -> None:
        cfg, n = self.config, self.config.image_size
        _paste(
            image,
            self.distractors[rng.integers(len(self.distractors))],
            (rng.uniform(0, n), rng.uniform(0, n)),
            rng.uniform(*cfg.clutter_scale) * n,
            rng.uniform(0, 2 * np.pi),
            self._random_colour(rng),
            TEXTURES[rng.integers(len(TEXTURES))],
            rng.uniform(*_TEXTURE_FREQ),
            cfg.texture_contrast,
        )

    def render(self, labels: np.ndarray, scene: int, rng: np.random.Generator) -> np.ndarray:
        """One image.

        Args:
            labels: (C,) 0/1 labels; every positive class is drawn once.
            scene: The background's scene id.

        Returns:
            (H, W, 3) uint8.
        """
        cfg, n = self.config, self.config.image_size
        image = self.background(scene, rng)
        clutter = int(rng.poisson(cfg.clutter_rate))
        front = int(rng.binomial(clutter, cfg.clutter_front_prob))
        for _ in range(clutter - front):
            self._distractor(image, rng)
        placed: list[tuple[float, float, float]] = []  # (x, y, radius) of drawn objects
        for cls in rng.permutation(np.flatnonzero(labels)):
            diameter = rng.uniform(*cfg.object_scale) * n
            radius = diameter / 2
            best, best_gap = None, -np.inf
            for _ in range(20):  # rejection sampling of a centre that keeps enough of the others visible
                x, y = rng.uniform(0.6 * radius, n - 0.6 * radius, 2)
                gap = min(
                    (np.hypot(x - px, y - py) - (1 - cfg.max_overlap) * (radius + pr) for px, py, pr in placed),
                    default=0.0,
                )
                if gap > best_gap:
                    best, best_gap = (x, y), gap
                if gap >= 0:
                    break
            placed.append((best[0], best[1], radius))
            _paste(
                image,
                self.templates[cls],
                best,
                diameter,
                np.deg2rad(rng.uniform(-cfg.max_rotation, cfg.max_rotation)),
                self._random_colour(rng, self.class_hues[cls] + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter)),
                self.class_textures[cls],
                rng.uniform(*_TEXTURE_FREQ),
                cfg.texture_contrast,
            )
        for _ in range(front):
            self._distractor(image, rng)
        image += rng.normal(0, cfg.noise_std, image.shape).astype(np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate_split(
    config: SyntheticConfig, split: str, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one split in memory.

    Args:
        config: The dataset config.
        split: ``"train"``, ``"val"`` or ``"test"``.
        progress: Show a tqdm bar.

    Returns:
        images (N, H, W, 3) uint8, labels (N, C) uint8 and scenes (N, 2) int16 (second scene -1 if none).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = getattr(config, f"n_{split}")
    probs = scene_class_probabilities(config)
    renderer = _Renderer(config)
    images = np.empty((n, config.image_size, config.image_size, 3), dtype=np.uint8)
    labels = np.empty((n, config.num_classes), dtype=np.uint8)
    scenes = np.empty((n, 2), dtype=np.int16)
    split_id = SPLITS.index(split)
    for i in tqdm(range(n), desc=f"synthetic {split}", disable=not progress, leave=False):
        rng = np.random.default_rng([config.seed, split_id, i])
        labels[i], scenes[i] = _draw_labels(probs, config, rng)
        images[i] = renderer.render(labels[i], int(scenes[i, 0]), rng)
    return images, labels, scenes


# ----------------------------------------------------------------------------------------------- storage


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_dir(config: SyntheticConfig, out_dir: Path = DATA_DIR / "synthetic") -> Path:
    """The folder :func:`make_synthetic` writes ``config`` to."""
    return Path(out_dir) / f"{config.image_size}px-seed{config.seed}-{config.key()}"


def _verify(folder: Path, config: SyntheticConfig) -> None:
    """Check ``meta.json`` against ``config`` and every file against its recorded SHA-256."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is unreadable ({err}); rerun with force=True (--force)") from err
    if meta.get("generator_version") != GENERATOR_VERSION or meta.get("config") != config.to_json():
        raise ValueError(f"{meta_path} describes another config or generator version; rerun with force=True")
    for name, digest in meta["sha256"].items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"{path} is missing or its SHA-256 differs from {meta_path}; rerun with force=True")


def _write_splits(folder: Path, config: SyntheticConfig, progress: bool) -> list[str]:
    """Generate every split into ``folder``: ``images_{split}.npy`` and one ``labels.npz``; returns the file names."""
    arrays = {}
    for split in SPLITS:
        images, labels, scenes = generate_split(config, split, progress=progress)
        np.save(folder / f"images_{split}.npy", images)
        arrays[f"labels_{split}"], arrays[f"scenes_{split}"] = labels, scenes
    np.savez(folder / "labels.npz", **arrays)
    return [f"images_{split}.npy" for split in SPLITS] + ["labels.npz"]


def _write_meta(folder: Path, config: SyntheticConfig, files: list[str], start: float) -> None:
    """Write ``meta.json``: generator version, config, class names, SHA-256 of ``files``, seconds since ``start``."""
    meta = {
        "generator_version": GENERATOR_VERSION,
        "config": config.to_json(),
        "classes": list(CLASS_NAMES[: config.num_classes]),
        "textures": [TEXTURES[k % len(TEXTURES)] for k in range(config.num_classes)],
        "sha256": {name: _sha256(folder / name) for name in files},
        "generation_seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _move_into_place(tmp: Path, folder: Path, config: SyntheticConfig, force: bool) -> None:
    """Rename the finished ``tmp`` to ``folder``, replacing an old copy when ``force``d.

    If another process finished the same config first, its copy is verified and used instead.
    """
    if force and folder.exists():
        old = tmp.with_suffix(".old")
        os.replace(folder, old)
        shutil.rmtree(old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        _verify(folder, config)


def make_synthetic(
    config: SyntheticConfig | None = None,
    out_dir: Path = DATA_DIR / "synthetic",
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the dataset for ``config`` on disk, or reuse the copy already there.

    The folder (see :func:`dataset_dir`) holds ``images_{split}.npy`` (N, H, W, 3) uint8, ``labels.npz``
    (``labels_{split}`` (N, C) uint8 and ``scenes_{split}`` (N, 2) int16) and ``meta.json`` (generator
    version, config, class names, SHA-256 of every file, generation time). It is written to a temporary
    folder and moved into place, so an interrupted run leaves no partial dataset.

    Args:
        config: Dataset config; the default :class:`SyntheticConfig` if None.
        out_dir: Parent folder.
        force: Regenerate even if a valid copy exists.
        progress: Show tqdm bars.

    Returns:
        The dataset folder.

    Raises:
        ValueError: An existing copy does not match its meta.json (edited or corrupt files); the message
            names the file. Use ``force=True`` to regenerate.
    """
    config = SyntheticConfig() if config is None else config
    folder = dataset_dir(config, out_dir)
    if folder.exists() and not force:
        _verify(folder, config)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".tmp", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0o700; the dataset folder gets the usual permissions
    try:
        files = _write_splits(tmp, config, progress)
        _write_meta(tmp, config, files, start)
        _move_into_place(tmp, folder, config, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load_synthetic(
    config: SyntheticConfig | None = None,
    out_dir: Path = DATA_DIR / "synthetic",
    *,
    progress: bool = True,
) -> dict[str, MultiLabelDataset]:
    """The three splits of the synthetic benchmark with all labels observed, generating them if needed.

    Images are memory-mapped read-only from the ``.npy`` files.

    Args:
        config: Dataset config; the default :class:`SyntheticConfig` if None.
        out_dir: Parent folder, as for :func:`make_synthetic`.
        progress: Show tqdm bars if the data has to be generated.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``, each a :class:`MultiLabelDataset` with images
        (N, H, W, 3) uint8 and ``observed == labels``.
    """
    config = SyntheticConfig() if config is None else config
    folder = make_synthetic(config, out_dir, progress=progress)
    classes = json.loads((folder / "meta.json").read_text())["classes"]
    with np.load(folder / "labels.npz") as arrays:
        labels = {split: arrays[f"labels_{split}"] for split in SPLITS}
    return {
        split: MultiLabelDataset(
            classes,
            labels[split],
            images=np.load(folder / f"images_{split}.npy", mmap_mode="r"),
            name=f"synthetic-{split}",
        )
        for split in SPLITS
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate (or verify) the dataset and print its label statistics."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=_positive_int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--n-train", type=_positive_int, default=defaults.n_train)
    parser.add_argument("--n-val", type=_positive_int, default=defaults.n_val)
    parser.add_argument("--n-test", type=_positive_int, default=defaults.n_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR / "synthetic")
    parser.add_argument("--force", action="store_true", help="regenerate even if a valid copy exists")
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults,
        image_size=args.size,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
    )
    start = time.perf_counter()
    folder = make_synthetic(config, args.out_dir, force=args.force)
    print(f"{folder}  ({time.perf_counter() - start:.1f} s)")
    with np.load(folder / "labels.npz") as arrays:
        stats = label_statistics(arrays["labels_train"])
    for name, value in stats.items():
        shown = [round(v, 3) for v in value] if isinstance(value, list) and name != "labels_per_image_hist" else value
        print(f"{name}: {round(shown, 3) if isinstance(shown, float) else shown}")


if __name__ == "__main__":
    main()
