"""The training engine end to end on the tiny embedded benchmark: files, selection, determinism, resumption, NaN."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from clml_core import engine as engine_module
from clml_core import loaders, train_state
from clml_core.config import apply_updates, resolve_config, validate_config
from clml_core.data import MultiLabelDataset
from clml_core.data.dataset import collate
from clml_core.engine import NonFiniteLossError, train
from clml_core.losses import CLMLLoss
from clml_core.losses.authors import AuthorsCLMLLoss
from clml_core.paths import PROJ_ROOT

FAST = {
    "progress": False,
    "threads": 1,
    "data": {"limit_train": 192},
    "optim": {"epochs": 2, "batch_size": 32},
    "clml": {"correction_start_epoch": 1},
}


def _config(**sections):
    config = apply_updates(resolve_config("smoke", overrides=FAST), sections)
    validate_config(config)
    return config


def _metrics(run):
    return pd.read_csv(run / "metrics.csv").drop(columns=["seconds"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "a"
    results = train(_config(optim={"ema_decay": 0.9}), run)
    return run, results


def test_run_folder_holds_everything(finished_run):
    run, results = finished_run
    for name in (
        "config.yaml",
        "run_info.json",
        "metrics.csv",
        "results.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "test_embeddings.npz",
        "train_scores.npz",
    ):
        assert (run / name).is_file(), name
    with np.load(run / "train_scores.npz") as seen:
        assert seen["scores"].shape == seen["observed"].shape == seen["labels"].shape == (192, 20)
        assert ((seen["scores"] >= 0) & (seen["scores"] <= 1)).all()
        assert (seen["observed"] <= seen["labels"]).all() and seen["observed"].sum() < seen["labels"].sum()
    saved = json.loads((run / "results.json").read_text())
    assert {"test_map", "best_val_map", "best_epoch"} <= set(saved)
    assert saved["test_map"] == pytest.approx(results["test_map"])
    assert 0 <= saved["test_map"] <= 100
    info = json.loads((run / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"]
    assert "git_sha" in info and len(info["observed_train_checksum"]) > 16
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1]
    # Correction starts at epoch 1: no correction statistics before, real ones after.
    assert pd.isna(metrics.loc[0, "corr_precision"]) and metrics.loc[1, "corr_recovered"] >= 0


def test_selection_uses_validation_only(finished_run):
    run, results = finished_run
    metrics = pd.read_csv(run / "metrics.csv")
    scores = metrics[["val_map", "val_map_ema"]]
    assert results["best_val_map"] == pytest.approx(scores.max().max())
    assert results["best_epoch"] == int(scores.max(axis=1).idxmax())
    assert not any("test" in column for column in metrics.columns)


def test_same_seed_gives_same_metrics(finished_run, tmp_path):
    run, _ = finished_run
    train(_config(optim={"ema_decay": 0.9}), tmp_path / "b")
    pd.testing.assert_frame_equal(_metrics(run), _metrics(tmp_path / "b"))


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(finished_run, tmp_path):
    run, results = finished_run
    config = _config(optim={"ema_decay": 0.9}, checkpoint_every=2)
    # 6 steps per epoch: stop at step 9 (epoch 1, step 3); the last checkpoint is at epoch 1, step 2.
    assert train(config, tmp_path / "c", max_steps=9) == {}
    assert not (tmp_path / "c" / "results.json").exists()
    resumed = train(config, tmp_path / "c", resume=True)
    pd.testing.assert_frame_equal(_metrics(run), _metrics(tmp_path / "c"))
    assert resumed["test_map"] == results["test_map"]


def test_existing_run_is_not_overwritten(finished_run):
    run, _ = finished_run
    with pytest.raises(FileExistsError, match="resume"):
        train(_config(optim={"ema_decay": 0.9}), run)


def test_resume_with_another_config_is_refused(finished_run, tmp_path):
    config = _config(checkpoint_every=2)
    train(config, tmp_path / "d", max_steps=3)
    with pytest.raises(ValueError, match="clml.lam"):
        train(_config(checkpoint_every=2, clml={"lam": 0.5}), tmp_path / "d", resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = _config()
    original = engine_module.Trainer._train_step

    def poisoned(self, images, observed, index):
        if self.epoch == 1:
            images = images * float("nan")
        return original(self, images, observed, index)

    monkeypatch.setattr(engine_module.Trainer, "_train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1 step 0.*last good checkpoint"):
        train(config, tmp_path / "e")
    state = torch.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(p).all() for p in state["model"].values() if p.is_floating_point())


def _clml_embedding_grad(loss_fn, scaler):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(24, 16)
    labels = torch.rand(24, 6) < 0.4
    loss = loss_fn(layer(x), labels)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    return layer.weight.grad.clone()


def test_clml_gradient_survives_the_amp_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    reference = _clml_embedding_grad(CLMLLoss(), None)
    scaled = _clml_embedding_grad(CLMLLoss(), scaler)
    torch.testing.assert_close(scaled, reference, rtol=1e-5, atol=1e-7)


def test_the_authors_release_loses_the_gradient_under_the_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    reference = _clml_embedding_grad(AuthorsCLMLLoss(), None)
    scaled = _clml_embedding_grad(AuthorsCLMLLoss(), scaler)
    torch.testing.assert_close(scaled, reference / 2.0**16, rtol=1e-5, atol=1e-12)
    # Without scaling the two implementations agree (lam = 1).
    torch.testing.assert_close(reference, _clml_embedding_grad(CLMLLoss(), None), rtol=1e-4, atol=1e-6)


def test_static_loss_scale_changes_nothing_for_our_clml_but_starves_the_released_one(tmp_path):
    """optim.loss_scale emulates AMP loss scaling on CPU (exact: the scale is a power of two)."""
    runs = {}
    for authors in (False, True):
        for scale in (0.0, 65536.0):
            config = _config(optim={"epochs": 1, "loss_scale": scale}, clml={"authors_release": authors})
            name = f"authors{int(authors)}-scale{int(scale)}"
            train(config, tmp_path / name)
            runs[authors, scale] = _metrics(tmp_path / name)
    pd.testing.assert_frame_equal(runs[False, 0.0], runs[False, 65536.0])
    assert runs[True, 0.0]["train_clml"].iloc[0] != runs[True, 65536.0]["train_clml"].iloc[0]


def test_growing_loss_scale_follows_the_release_schedule_on_cpu(tmp_path):
    """optim.loss_scale_doublings runs the release's dynamic GradScaler in fp32 on CPU: 65536, doubling every
    steps / doublings overflow-free steps; the released CLML's gradient shrinks with it, ours does not change."""
    runs = {}
    for authors in (False, True):
        for doublings in (0.0, 3.0):
            optim = {"epochs": 2, "loss_scale": 65536.0, "loss_scale_doublings": doublings}
            run = tmp_path / f"authors{int(authors)}-doublings{int(doublings)}"
            train(_config(optim=optim, clml={"authors_release": authors}), run)
            runs[authors, doublings] = _metrics(run)
    scaler = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    interval = scaler["growth_interval"]
    steps = 3 * interval + scaler["_growth_tracker"]  # 3 doublings, then the steps since the last one
    assert interval >= 2 and interval == int(steps / 3.0)
    assert scaler["scale"] == 65536.0 * 2**3  # fp32: no overflow, no backoff
    pd.testing.assert_frame_equal(runs[False, 0.0], runs[False, 3.0])  # powers of two: exact for our CLML
    assert not runs[True, 0.0].equals(runs[True, 3.0])  # the release's CLML gradient shrinks with the scale


def _cli(out, *overrides, processes=1):
    """The training CLI on the smoke preset in a subprocess (under torchrun when processes > 1)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [
        sys.executable,
        *(launcher if processes > 1 else []),
        "-m",
        "clml_core.train",
        "--preset",
        "smoke",
        "--out",
        str(out),
        *overrides,
    ]
    return subprocess.run(command, cwd=PROJ_ROOT, capture_output=True, text=True, timeout=300)


def test_cli_trains_the_smoke_preset(tmp_path):
    out = tmp_path / "cli"
    overrides = ("progress=false", "threads=1", "data.limit_train=96", "optim.epochs=1")
    done = _cli(out, *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test mAP" in done.stdout and (out / "results.json").is_file()
    again = _cli(out, *overrides)
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_cli_rejects_a_bad_override(tmp_path):
    done = _cli(tmp_path / "x", "clml.enabled=maybe")
    assert done.returncode == 2 and "clml.enabled" in done.stderr and "boolean" in done.stderr


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_the_smoke_preset(tmp_path):
    out = tmp_path / "ddp"
    overrides = ("progress=false", "threads=1", "data.limit_train=128", "optim.epochs=2")
    done = _cli(out, *overrides, "clml.correction_start_epoch=1", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1] and metrics["train_clml"].abs().gt(0).all()
    assert 0 <= json.loads((out / "results.json").read_text())["test_map"] <= 100


def test_correction_can_feed_the_base_loss_without_a_clml_term(tmp_path):
    train(_config(clml={"enabled": False, "correct_base": True}), tmp_path / "f")
    metrics = pd.read_csv(tmp_path / "f" / "metrics.csv")
    assert pd.isna(metrics.loc[0, "corr_recall"]) and pd.notna(metrics.loc[1, "corr_recall"])
    assert (metrics["train_clml"] == 0).all()


def test_tensorboard_logs_every_step_and_epoch_beside_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(_config(tensorboard=True, log_every=1, clml={"quantile": 0.9}), run)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    steps_per_epoch = 192 // 32
    for tag in ("step/loss", "step/base", "step/clml", "step/local", "step/global", "step/lr"):
        assert [e.step for e in events.Scalars(tag)] == list(range(2 * steps_per_epoch)), tag
    metrics = pd.read_csv(run / "metrics.csv")
    logged = events.Scalars("epoch/val_map")
    assert [e.step for e in logged] == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]
    assert np.allclose([e.value for e in logged], metrics["val_map"], rtol=1e-6)
    assert np.allclose([e.value for e in events.Scalars("epoch/train_loss")], metrics["train_loss"], rtol=1e-6)
    assert [e.step for e in events.Scalars("epoch/corr_recall")] == [2 * steps_per_epoch - 1]  # NaN at epoch 0


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    config = _config(tensorboard=True, log_every=1, checkpoint_every=2)
    assert train(config, run, max_steps=5) == {}  # steps 0-4 logged, the last checkpoint after step 3
    train(config, run, resume=True)  # continues from step 4: the first attempt's step 4 is dropped, then logged anew
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("step/loss")] == list(range(2 * (192 // 32)))


def test_tensorboard_off_writes_no_event_files(finished_run):
    run, _ = finished_run
    assert not (run / "tensorboard").exists()


def test_quantile_correction_recovers_fewer_labels_than_tau_alone(tmp_path):
    config = {"enabled": False, "correct_base": True, "tau": 0.05}  # tau low: almost every entry passes it alone
    train(_config(clml=config), tmp_path / "tau")
    train(_config(clml={**config, "quantile": 0.9}), tmp_path / "quantile")
    tau, quantile = (pd.read_csv(tmp_path / name / "metrics.csv").loc[1] for name in ("tau", "quantile"))
    assert 0 < quantile["corr_recovered"] < tau["corr_recovered"]
    # Above the 0.9 quantile of u entries lie at most ceil(0.1 (u - 1)) < 0.1 u + 1 of them, per class and batch.
    assert quantile["corr_recovered"] <= 0.1 * 192 * 20 + 20 * (192 // 32)


def test_a_coco_layout_trains_through_the_packed_cache(tmp_path, write_image):
    """The real-dataset path: official COCO layout, protocol on train, validation carved from it, packed cache."""
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]
    rng = np.random.default_rng(0)
    for split, count in (("train2014", 48), ("val2014", 16)):
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in range(count)]
        annotations = [
            {"image_id": i, "category_id": c["id"]} for i in range(count) for c in categories if rng.random() < 0.5
        ] + [{"image_id": i, "category_id": 1} for i in range(count)]
        (tmp_path / "annotations").mkdir(exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for image in images:
            write_image(tmp_path / split / image["file_name"], seed=image["id"], height=20, width=24)
    config = resolve_config(
        "smoke",
        overrides={
            "progress": False,
            "data": {
                "dataset": "coco",
                "root": str(tmp_path),
                "image_size": 16,
                "packed_cache": True,
                "cache_dir": str(tmp_path / "cache"),
                "fraction": 0.75,
                "val_fraction": 0.25,
            },
            "model": {"widths": [8, 16]},
            "optim": {"epochs": 1, "batch_size": 8},
        },
    )
    results = train(config, tmp_path / "run")
    assert 0 <= results["test_map"] <= 100
    # One cache per source split; the train / validation carve indexes rows of the train2014 cache.
    assert sorted(p.name for p in (tmp_path / "cache" / "coco").glob("*.npy")) == [
        "train2014-16px.npy",
        "val2014-16px.npy",
    ]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (info["n_train"], info["n_val"], info["n_test"]) == (36, 12, 16)


def test_device_ema_equals_torchs_averaged_model_also_after_a_reload():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    ours = train_state.DeviceEMA(model, 0.9)
    reference = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        model(torch.randn(6, 3, 5, 5)).square().mean().backward()  # also moves the BatchNorm buffers
        optimizer.step()
        optimizer.zero_grad()
        ours.update_parameters(model)
        reference.update_parameters(model)
        if step == 2:  # a resumed run: a fresh EMA loads the saved state
            state = ours.state_dict()
            ours = train_state.DeviceEMA(model, 0.9)
            ours.load_state_dict(state)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_batch_size_is_the_global_batch_split_over_ranks():
    config = _config(optim={"batch_size": 12})
    single = list(loaders.EpochBatches(50, config.optim.batch_size, config.seed))
    assert len(single) == 4 and all(len(batch) == 12 for batch in single)
    per_rank = []
    for rank in range(3):
        per_rank.append(list(loaders.EpochBatches(50, config.optim.batch_size, config.seed, rank, world_size=3)))
    assert all(len(batches) == 4 and all(len(b) == 4 for b in batches) for batches in per_rank)
    for step in range(4):  # the ranks' slices of a step are the single-process batch, in rank order
        assert sum((per_rank[r][step] for r in range(3)), []) == single[step]
    with pytest.raises(ValueError, match="optim.batch_size.*10.*3 processes"):
        loaders.rank_batch_size(_config(optim={"batch_size": 10}).optim.batch_size, world_size=3)


@pytest.mark.parametrize("augment", [False, True])
def test_training_loader_batches_equal_the_items_read_one_by_one(augment):
    """The training loader reads a batch in one call (``__getitems__``) where nothing is drawn, item by item under
    each item's seed otherwise; either way a batch holds exactly the items ``SeededItems[key]`` gives."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(10, 3)).astype(np.uint8)
    flip = lambda image: image.flip(-1) if torch.rand(()) < 0.5 else image  # noqa: E731 (a drawn transform)
    dataset = MultiLabelDataset(["a", "b", "c"], labels, images=images, transform=flip if augment else None)
    items = loaders.SeededItems(dataset, seed=3, augment=augment)
    batches = loaders.EpochBatches(10, 4, seed=3)
    loader = loaders.train_loader(dataset, batches, seed=3, augment=augment, workers=0, device=torch.device("cpu"))
    for keys, batch in zip(iter(batches), loader, strict=True):
        want = collate([items[key] for key in keys])
        for got, expected in zip(batch, want):
            assert torch.equal(got, expected)


def test_reading_the_logged_terms_every_step_or_every_few_steps_logs_the_same(tmp_path):
    every = _metrics_after(train(_config(log_every=1), tmp_path / "a"), tmp_path / "a")
    few = _metrics_after(train(_config(log_every=4), tmp_path / "b"), tmp_path / "b")
    pd.testing.assert_frame_equal(every, few, rtol=1e-12, atol=0)


def _metrics_after(results, run):
    assert results["epochs"] == 2
    return _metrics(run)


def test_correction_quality_over_the_whole_run_and_in_the_selected_epoch(tmp_path):
    run = tmp_path / "run"
    results = train(_config(clml={"tau": 0.1, "correction_start_epoch": 0}), run)
    metrics = pd.read_csv(run / "metrics.csv")
    assert (metrics["corr_recovered"] > 0).all()  # a low threshold: correction recovers labels in every epoch
    true, recovered, missing = (metrics[c].sum() for c in ("corr_true_recovered", "corr_recovered", "corr_missing"))
    assert np.isclose(results["run_corr_precision"], true / recovered)
    assert np.isclose(results["run_corr_recall"], true / missing)
    selected = metrics[metrics["epoch"] == results["best_epoch"]].iloc[0]
    for name in ("precision", "recall"):
        expected = selected[f"corr_{name}"]
        assert np.isclose(results[f"selected_corr_{name}"], expected, equal_nan=True) or (
            results[f"selected_corr_{name}"] is None and np.isnan(expected)  # JSON writes NaN as null
        )
