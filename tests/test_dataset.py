"""MultiLabelDataset: validation, image decoding (modes, broken files), arrays and memmaps, derived datasets."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clml_core.data import MultiLabelDataset
from clml_core.data.dataset import collate, read_image

CLASSES = ["cat", "dog", "car"]
LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)


def _array_dataset(n: int = 4, **kwargs) -> MultiLabelDataset:
    images = np.random.default_rng(0).integers(0, 256, size=(n, 5, 7, 3), dtype=np.uint8)
    return MultiLabelDataset(CLASSES, LABELS[:n], images=images, **kwargs)


def _pil_rgb(path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


# --- construction and validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=np.zeros(4)), "labels must be a 2-D"),
        (dict(labels=np.array([[0, 2, 0]] * 4)), r"labels\[0, 1\] = 2"),
        (dict(labels=np.full((4, 3), 0.5)), r"labels\[0, 0\] = 0.5"),
        (dict(labels=np.array([["a", "b", "c"]] * 4)), "labels must be numeric"),
        (dict(labels=np.zeros((4, 2))), "labels has 2 columns but there are 3 classes"),
        (dict(classes=["a", "a", "b"]), r"classes must be unique, duplicated: \['a'\]"),
        (dict(classes=[]), "classes must name at least one class"),
        (dict(classes=["a", "", "b"]), r"classes\[1\] must be a non-empty string"),
        (dict(images=None), "give image_paths or images"),
        (dict(images=np.zeros((4, 5, 7), np.uint8)), r"images must have shape \(N, H, W, 3\)"),
        (dict(images=np.zeros((4, 5, 7, 3), np.float32)), "images must have dtype uint8"),
        (dict(images=np.zeros((3, 5, 7, 3), np.uint8)), "images has 3 rows but labels has 4 rows"),
        (dict(image_paths=["a.jpg"] * 3), "image_paths has 3 entries but labels has 4 rows"),
        (dict(image_paths="a.jpg"), "image_paths must be a sequence of paths"),
        (dict(observed=np.zeros((4, 2))), r"observed must have shape \(4, 3\)"),
        (dict(observed=np.full((4, 3), -1)), r"observed\[0, 0\] = -1"),
    ],
)
def test_construction_rejects_bad_fields(kwargs, match):
    fields = dict(classes=CLASSES, labels=LABELS, images=np.zeros((4, 5, 7, 3), np.uint8), image_paths=None)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MultiLabelDataset(**fields)


def test_construction_rejects_non_callable_transform():
    with pytest.raises(TypeError, match="transform must be callable"):
        _array_dataset(transform=3)


def test_labels_are_validated_copies_and_read_only():
    labels = LABELS.astype(np.int64)
    ds = MultiLabelDataset(CLASSES, labels, images=np.zeros((4, 2, 2, 3), np.uint8))
    labels[0, 0] = 0  # the caller's array changes afterwards
    assert ds.labels.dtype == np.uint8 and ds.labels[0, 0] == 1
    np.testing.assert_array_equal(ds.observed, LABELS)  # observed defaults to the labels
    with pytest.raises(ValueError, match="read-only"):
        ds.labels[0, 0] = 0
    with pytest.raises(ValueError, match="read-only"):
        ds.observed[0, 0] = 0


def test_bool_labels_accepted():
    ds = MultiLabelDataset(CLASSES, LABELS.astype(bool), images=np.zeros((4, 2, 2, 3), np.uint8))
    np.testing.assert_array_equal(ds.labels, LABELS)
    assert ds.num_classes == 3 and len(ds) == 4


# --- items from an image array --------------------------------------------------------------------------


def test_getitem_from_array_returns_chw_uint8_observed_and_index():
    observed = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    ds = _array_dataset(observed=observed)
    for i in range(len(ds)):
        image, target, index = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
        torch.testing.assert_close(image, torch.from_numpy(ds.images[i]).permute(2, 0, 1))
        assert target.dtype == torch.float32 and target.tolist() == observed[i].tolist()
        assert index == i


def test_negative_and_out_of_range_indices():
    ds = _array_dataset()
    torch.testing.assert_close(ds[-1][0], ds[3][0])
    assert ds[-1][2] == 3
    with pytest.raises(IndexError, match="index 4 out of range"):
        ds[4]
    with pytest.raises(IndexError):
        ds[-5]
    with pytest.raises(TypeError):
        ds[1.0]


def test_memmap_images(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(4, 6, 8, 3), dtype=np.uint8)
    mm = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=images.shape)
    mm[:] = images
    mm.flush()
    readonly = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="r", shape=images.shape)
    ds = MultiLabelDataset(CLASSES, LABELS, images=readonly)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        image = ds[2][0]
    torch.testing.assert_close(image, torch.from_numpy(images[2]).permute(2, 0, 1))
    image[:] = 0  # the tensor owns its memory; the memmap is untouched
    assert (readonly[2] == images[2]).all()


def test_transform_is_applied_and_must_return_a_tensor():
    ds = _array_dataset(transform=lambda x: x.float() / 255.0)
    image = ds[0][0]
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(ds.images[0]).permute(2, 0, 1).float() / 255.0)
    with pytest.raises(TypeError, match="transform must return a torch.Tensor"):
        ds.with_transform(lambda x: x.numpy())[0]


def test_dataloader_collates_batches():
    ds = _array_dataset()
    images, targets, indices = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 5, 7) and targets.shape == (3, 3) and indices.tolist() == [0, 1, 2]


def _items_equal(got, want) -> None:
    assert len(got) == len(want)
    for (image, observed, index), (image_w, observed_w, index_w) in zip(got, want):
        assert index == index_w and isinstance(index, int)
        assert image.dtype == image_w.dtype and image.is_contiguous()
        assert torch.equal(image, image_w) and torch.equal(observed, observed_w)


@pytest.mark.parametrize("rows", [[2, 0, 3], [1], [-1, 0, 0], []])
def test_batch_read_equals_item_reads(tmp_path, rows):
    """``__getitems__`` (one read for a DataLoader batch) gives what ``ds[i]`` gives, for an array, a memmap
    subset (row indirection), a transform, negative and repeated indices."""
    images = np.random.default_rng(2).integers(0, 256, size=(4, 6, 8, 3), dtype=np.uint8)
    mm = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=images.shape)
    mm[:] = images
    mm.flush()
    readonly = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="r", shape=images.shape)
    in_memory = _array_dataset()
    subset = MultiLabelDataset(CLASSES, LABELS, images=readonly).subset([3, 1, 0, 2])
    transformed = _array_dataset(transform=lambda x: x.float() / 255.0)
    for ds in (in_memory, subset, transformed):
        _items_equal(ds.__getitems__(rows), [ds[i] for i in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        image = subset.__getitems__([0])[0][0]
    image[:] = 0  # a writable view of the batch's copy; the memmap is untouched
    assert (readonly[3] == images[3]).all()


def test_batch_read_of_files_and_bad_indices(tmp_path, write_image):
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    files = MultiLabelDataset(CLASSES, LABELS, image_paths=paths)
    _items_equal(files.__getitems__([3, 0]), [files[3], files[0]])
    with pytest.raises(IndexError, match="index 4 out of range"):
        _array_dataset().__getitems__([0, 4])
    with pytest.raises(TypeError, match="transform must return a torch.Tensor"):
        _array_dataset(transform=lambda x: x.numpy()).__getitems__([0])


def test_dataloader_batches_equal_item_batches():
    """A DataLoader batch read through ``__getitems__`` equals the one collated from single items."""
    ds = _array_dataset()
    batched = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    single = collate([ds[i] for i in range(4)])
    for got, want in zip(batched, single):
        assert torch.equal(got, want)


# --- derived datasets ------------------------------------------------------------------------------------


def test_with_observed_returns_a_new_validated_dataset():
    ds = _array_dataset()
    observed = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    new = ds.with_observed(observed)
    assert new is not ds
    np.testing.assert_array_equal(new.observed, observed)
    np.testing.assert_array_equal(ds.observed, LABELS)
    np.testing.assert_array_equal(new.labels, LABELS)
    assert new[2][1].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(new[2][0], ds[2][0])
    with pytest.raises(ValueError, match=r"observed must have shape \(4, 3\)"):
        ds.with_observed(observed[:3])
    bad = observed.copy()
    bad[1, 1] = 7
    with pytest.raises(ValueError, match=r"observed\[1, 1\] = 7"):
        ds.with_observed(bad)


def test_with_transform_leaves_the_original_untouched():
    ds = _array_dataset()
    new = ds.with_transform(lambda x: x[:1])
    assert new[0][0].shape == (1, 5, 7) and ds[0][0].shape == (3, 5, 7)
    with pytest.raises(TypeError, match="transform must be callable"):
        ds.with_transform("flip")


@pytest.mark.parametrize("indices", [[3, 1], np.array([3, 1]), [-1, 1]])
def test_subset_selects_rows_in_order(indices):
    ds = _array_dataset(observed=LABELS * np.array([1, 0, 1]))
    sub = ds.subset(indices)
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.labels, LABELS[[3, 1]])
    np.testing.assert_array_equal(sub.observed, (LABELS * np.array([1, 0, 1]))[[3, 1]])
    torch.testing.assert_close(sub[0][0], ds[3][0])
    torch.testing.assert_close(sub[1][0], ds[1][0])
    assert sub[1][2] == 1  # indices are the subset's own rows


def test_subset_of_subset_shares_the_image_array():
    ds = _array_dataset()
    sub = ds.subset([3, 2, 0]).subset(np.array([False, True, True]))
    np.testing.assert_array_equal(sub.labels, LABELS[[2, 0]])
    torch.testing.assert_close(sub[0][0], ds[2][0])
    torch.testing.assert_close(sub[1][0], ds[0][0])
    assert sub._images is ds._images  # no copy of a (possibly memory-mapped) array
    np.testing.assert_array_equal(sub.images, ds.images[[2, 0]])


def test_subset_rejects_bad_indices():
    ds = _array_dataset()
    with pytest.raises(IndexError, match="index 4 out of range"):
        ds.subset([0, 4])
    with pytest.raises(ValueError, match="boolean indices must have length 4"):
        ds.subset(np.array([True, False]))
    with pytest.raises(ValueError, match="indices must be 1-D"):
        ds.subset(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="indices must be integers"):
        ds.subset([0.5])
    assert len(ds.subset([])) == 0


def test_subset_of_file_dataset_keeps_paths(tmp_path, write_image):
    paths = [write_image(tmp_path / f"{k}.png", seed=k) for k in range(4)]
    ds = MultiLabelDataset(CLASSES, LABELS, image_paths=[str(p) for p in paths])
    sub = ds.subset([2, 0])
    assert sub.image_paths == [paths[2], paths[0]]
    assert sub.images is None
    torch.testing.assert_close(sub[0][0], _pil_rgb(paths[2]))


# --- decoding files --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix,mode", [(".jpg", "RGB"), (".jpg", "L"), (".jpg", "CMYK"), (".png", "RGB"), (".png", "L")]
)
def test_decoding_matches_pil_rgb_conversion(tmp_path, write_image, suffix, mode):
    path = write_image(tmp_path / f"img{suffix}", seed=3, mode=mode)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 16)
    torch.testing.assert_close(image, _pil_rgb(path))
    if mode == "L":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_png_alpha_is_dropped(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    torch.testing.assert_close(image, torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1))


def test_palette_png_with_and_without_transparency(tmp_path):
    palette_img = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=8
    )
    palette_img.save(tmp_path / "p.png")
    palette_img.save(tmp_path / "pt.png", transparency=0)
    expected = torch.from_numpy(np.asarray(palette_img.convert("RGB")).copy()).permute(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on a direct P+transparency -> RGB conversion
        plain = read_image(tmp_path / "p.png")
        transparent = read_image(tmp_path / "pt.png")
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(transparent, expected)  # the colours, with the alpha dropped


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
    gray = np.array([[0, 255, 256, 65535], [1000, 30000, 40000, 513]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    expected = torch.from_numpy((gray >> 8).astype(np.uint8)).expand(3, -1, -1)
    torch.testing.assert_close(image, expected)


def test_float_image_mode_is_refused(tmp_path):
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f\.tiff has PIL mode 'F'"):
        read_image(tmp_path / "f.tiff")


def test_missing_file_names_the_file(tmp_path):
    ds = MultiLabelDataset(CLASSES, LABELS[:1], image_paths=[tmp_path / "gone.jpg"])
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ds[0]


def test_truncated_jpeg_raises_naming_the_file(tmp_path, write_image):
    path = write_image(tmp_path / "full.jpg", seed=0, height=64, width=64)
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    ds = MultiLabelDataset(CLASSES, LABELS[:1], image_paths=[tmp_path / "cut.jpg"])
    with pytest.raises(OSError, match=r"cannot decode image .*cut\.jpg"):
        ds[0]


def test_non_image_file_raises_naming_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(OSError, match=r"cannot decode image .*notes\.jpg"):
        read_image(tmp_path / "notes.jpg")


def test_repr_names_counts():
    text = repr(_array_dataset(name="toy"))
    assert "name='toy'" in text and "images=4" in text and "positives=6" in text


def test_pickling_reopens_a_memmap_instead_of_copying_it(tmp_path):
    shape = (6, 32, 32, 3)
    header = 128  # a memmap that starts after a header, as a packed cache may
    path = tmp_path / "cache.u8"
    images = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    path.write_bytes(b"h" * header + images.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=shape, offset=header)
    ds = MultiLabelDataset(CLASSES, np.resize(LABELS, (6, 3)), images=mm).subset([5, 1])
    payload = pickle.dumps(ds)
    assert len(payload) < images.nbytes // 4
    clone = pickle.loads(payload)
    assert isinstance(clone._images, np.memmap)
    torch.testing.assert_close(clone[0][0], torch.from_numpy(images[5]).permute(2, 0, 1))
    np.testing.assert_array_equal(clone.labels, ds.labels)
    in_memory = _array_dataset()  # a plain array is pickled with its data
    torch.testing.assert_close(pickle.loads(pickle.dumps(in_memory))[1][0], in_memory[1][0])
