"""The training engine, shared by the notebooks and the command line (:mod:`clml_core.train`).

:func:`train` trains one run into one folder (its layout: :mod:`clml_core.runfolder`; one owner, holding
``train.lock``, and one configuration: a resumed run trains with the folder's own ``config.yaml``, and another is
refused before any file is written). It builds the run's parts (:func:`clml_core.build.build_run`), continues from
the newest checkpoint and hands the parts to a :class:`Trainer`, which runs the epochs, selects weights on the
validation split only (scored with the labels training can see unless ``data.val_labels=full``) and scores the test
split once, with the selected weights. Every file is written atomically.

Resuming: the data order and every augmentation are functions of (seed, epoch, index) (:mod:`clml_core.loaders`),
and a checkpoint holds the model, optimiser, schedule, EMA, loss scaler, the objective's state, the epoch's running
sums and the random states, so a resumed run, even one killed mid-epoch, ends with the same result as an
uninterrupted one. The objective's epoch-start hook runs at step 0 of an epoch only, and early stopping
(``optim.early_stop``) is a rule on the metrics rows a checkpoint holds, so both resume too. Every checkpoint
(``best.pt`` too) carries a ``model_spec``: ``python -m clml_core.evaluate RUN_DIR`` rebuilds the model from it.

Stopping: see :mod:`clml_core.stopping` (SIGTERM or SIGINT checkpoint after the current step and raise
:class:`RunInterrupted`; the command line exits with :data:`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from clml_core import checkpoints, runfolder
from clml_core import distributed as dist_utils
from clml_core.build import RunParts, build_run
from clml_core.config import TrainConfig, config_diff, to_dict
from clml_core.correction import CorrectionQuality, correction_counts
from clml_core.data.dataset import shutdown_workers
from clml_core.devices import autocast, to_input
from clml_core.evaluate import load_weights, predict, score
from clml_core.loaders import eval_loader
from clml_core.metrics import mean_average_precision
from clml_core.objective import Batch
from clml_core.runio import atomic_link, atomic_torch_save
from clml_core.runlock import RunLock
from clml_core.stopping import EXIT_INTERRUPTED, RunInterrupted, StopSignals, StopState
from clml_core.train_state import EpochSums, PendingLogs, rng_state, set_rng_state

__all__ = ["EXIT_INTERRUPTED", "NonFiniteLossError", "RunInterrupted", "Trainer", "train"]

#: The logged terms of a step, in the order of :class:`~clml_core.train_state.PendingLogs` and ``metrics.csv``.
TERMS = ("loss", "base", "clml", "local", "global")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run stopped and its last good checkpoint was kept."""


class Trainer:
    """One training run in one folder, from built parts. Use :func:`train` unless you need the pieces.

    Args:
        parts: the run's parts (:func:`clml_core.build.build_run`).
        out: the run folder.
        config: the resolved configuration as a nested dict, which every checkpoint records and a resumed run's
            checkpoint must match.
    """

    def __init__(self, parts: RunParts, out: str | Path, config: dict[str, Any]) -> None:
        self.parts, self.settings, self.config = parts, parts.settings, config
        self.out = Path(out)
        self.ckpt_dir = self.out / checkpoints.FOLDER
        self.main = dist_utils.is_main_process()
        self.device, self.model, self.net, self.objective = parts.device, parts.model, parts.net, parts.objective
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.scaler, self.ema = parts.scaler, parts.ema
        self.train_labels = parts.splits.train.labels  # the full labels: correction counts only
        # Where the run continues from.
        self.epoch, self.step = 0, 0
        self.sums = EpochSums()
        self.pending = PendingLogs(self.device)
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_map": -math.inf, "epoch": -1, "variant": None}
        self.previous_best_epoch = -1  # the selection the checkpoint before the newest records
        self.stop = StopState(self)
        self.writer: Any = None  # a TensorBoard SummaryWriter while fit runs with the tensorboard setting

    # ---- checkpoints

    def _model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights a checkpoint keeps: all, or without the unchanged backbone when its weights have a source."""
        state = model.state_dict()
        if self.parts.spec["backbone_in_checkpoint"]:
            return state
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def state_dict(self) -> dict[str, Any]:
        """The training checkpoint: plain tensors and values (see :mod:`clml_core.checkpoints`)."""
        return {
            "config": self.config,
            "model_spec": self.parts.spec,
            "model": self._model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self._model_state(self.ema) if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "sums": self.sums.state_dict(),
            "rows": self.rows,
            "best": self.best,
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> None:
        if self.main:
            checkpoints.save(self.state_dict(), self.ckpt_dir)
            self._publish_best()

    def _publish_best(self) -> None:
        """Point ``best.pt`` at the selected weights ``last.pt`` records; keep those ``previous.pt`` records too.

        An evaluation writes improved weights as ``best-epoch{e}.pt``, published only once a checkpoint records the
        selection. A run resumed from an earlier checkpoint replays the epoch; should the replay select otherwise (a
        GPU replay need not be bitwise the same), the weights its checkpoint records are still there, and never
        are another trajectory's weights found under ``best.pt``.
        """
        epoch = self.best["epoch"]
        if epoch < 0:
            return
        atomic_link(checkpoints.best_epoch_file(self.ckpt_dir, epoch), self.ckpt_dir / checkpoints.BEST)
        keep = {checkpoints.best_epoch_file(self.ckpt_dir, e) for e in (epoch, self.previous_best_epoch)}
        for path in self.ckpt_dir.glob(checkpoints.BEST_EPOCH_GLOB):
            if path not in keep:
                path.unlink()
        self.previous_best_epoch = epoch

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint read by :func:`clml_core.checkpoints.read` (``path`` names it in errors)."""
        if state["config"] != self.config:
            diff = "; ".join(config_diff(state["config"], self.config))
            raise ValueError(f"{path} was written by another configuration than this run's ({diff})")
        load_weights(self.model, state["model"], self.parts.spec, str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], strict=self.parts.spec["backbone_in_checkpoint"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.sums = EpochSums.from_state_dict(state["sums"])
        self.rows, self.best = state["rows"], state["best"]
        self.previous_best_epoch = self.best["epoch"]  # this checkpoint is the previous one after the next save
        set_rng_state(state["rng"])

    def last_checkpoint_text(self) -> str:
        last = self.ckpt_dir / checkpoints.LAST
        if last.exists():
            return f"The last good checkpoint is {last}"
        return "No checkpoint was written yet (the run stopped before its first one)"

    # ---- one step

    def _train_step(self, images: Tensor, observed: Tensor, index: Tensor) -> None:
        device, settings = self.device, self.settings
        inputs = to_input(images, device, self.model.preprocessing, settings.channels_last)
        batch = Batch(inputs, observed.to(device, non_blocking=True), index)
        with autocast(device, settings.amp):
            terms = self.objective(self.net(batch.images), batch, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if settings.static_loss_scale:
            (terms["loss"] * settings.static_loss_scale).backward()
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.div_(settings.static_loss_scale)
        else:
            self.scaler.scale(terms["loss"]).backward()
        if settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.scaler.step(self.optimizer)  # a dynamic scaler (fp16, loss_scale_doublings) reads its inf check here
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        # Logged values and correction counts stay on the device until read_pending (every log_every steps).
        counts = None
        if terms["corrected"] is not None:
            full = torch.as_tensor(self.train_labels[index.numpy()]).to(device, non_blocking=True)
            counts = correction_counts(batch.observed, terms["corrected"], full)
        self.pending.add(self.step, torch.stack([terms[name] for name in TERMS]), counts)

    def read_pending(self) -> None:
        """Move the pending logged values to the host (one synchronisation), all-reduced over ranks.

        Under DDP every rank calls this at the same steps. The logged values are the rank means (the single-process
        values, see :mod:`clml_core.distributed`); correction counts are summed over ranks. A non-finite loss on any
        rank stops every rank here with the same error, before a checkpoint is written.

        Raises:
            NonFiniteLossError: a loss since the last read was NaN or Inf.
        """
        pending = self.pending
        if pending.steps == 0:
            return
        values = torch.cat([pending.terms, pending.correction, pending.bad, pending.bad, pending.first_bad])
        world = dist_utils.world_size()
        if world > 1:
            torch.distributed.all_reduce(values[:9])  # a view, reduced in place; the rest stays this rank's
        host = values.tolist()
        terms, correction, any_bad, own_bad, first = host[:5], host[5:8], host[8], host[9], host[10:]
        if any_bad:
            where = (
                f"{first[1]} at epoch {self.epoch} step {int(first[0])} (base {first[2]:.4g}, CLML {first[3]:.4g})"
                if own_bad
                else f"not finite on another rank in epoch {self.epoch}"
            )
            raise NonFiniteLossError(
                f"loss is {where}; the run stopped on every rank. {self.last_checkpoint_text()}; lower optim.lr or "
                "check the data (a resumed run keeps its configuration: start a new folder to change it)."
            )
        self.sums.add(pending.steps, [total / world for total in terms], CorrectionQuality(*map(int, correction)))
        if self.writer is not None:  # the means over the steps since the last read, at the last of them
            step = self.epoch * self.parts.steps_per_epoch + self.step - 1
            for name, total in zip(TERMS, terms):
                self.writer.add_scalar(f"step/{name}", total / world / pending.steps, step)
            self.writer.add_scalar("step/lr", self.scheduler.get_last_lr()[0], step)
        self.pending = PendingLogs(self.device)

    # ---- epochs

    def _evaluate_epoch(self, seconds: float) -> None:
        """Log the epoch's row; score the model (and its EMA) on validation and keep improved weights."""
        row = {"epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], **self.sums.row(), "seconds": seconds}
        if self.main:
            candidates = {"model": self.model} if self.ema is None else {"model": self.model, "ema": self.ema.module}
            for variant, net in candidates.items():
                pred = predict(
                    self.parts.runnable(net), self.parts.val_loader, self.device,
                    amp=self.settings.amp, channels_last=self.settings.channels_last,
                )  # fmt: skip
                val_map = float(mean_average_precision(pred["observed"], pred["scores"]))
                row["val_map" if variant == "model" else "val_map_ema"] = val_map
                if val_map > self.best["val_map"]:
                    self.best = {"val_map": val_map, "epoch": self.epoch, "variant": variant}
                    best = {"model_spec": self.parts.spec, "model": self._model_state(net)}
                    atomic_torch_save(best, checkpoints.best_epoch_file(self.ckpt_dir, self.epoch))
            self.model.train()
        self.rows.append(row)
        if self.main:
            runfolder.write_metrics(self.out, self.rows)
        if self.writer is not None:
            last_step = (self.epoch + 1) * self.parts.steps_per_epoch - 1  # the epoch's last step: its scalars' x
            for name, value in row.items():
                if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{name}", value, last_step)
            self.writer.flush()

    def fit(self, max_steps: int | None = None) -> bool:
        """Train until the last epoch (True) or until ``max_steps`` steps were taken in this call (False)."""
        self.model.train()
        if self.settings.tensorboard and self.main:
            purge = self.epoch * self.parts.steps_per_epoch + self.step
            self.writer = runfolder.summary_writer(self.out, purge)
        try:
            return self._fit_epochs(max_steps)
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    def _fit_epochs(self, max_steps: int | None) -> bool:
        settings, taken = self.settings, 0
        loader, sampler = self.parts.loader, self.parts.loader.batch_sampler
        while self.epoch < settings.last_epoch and not settings.early_stop.stops(self.rows):
            started = time.perf_counter()
            if self.step == 0:  # never inside an epoch, so a resumed run does not repeat it (see clml_core.objective)
                self.objective.epoch_start(self.epoch, self.parts.runnable(self.model))
            sampler.epoch, sampler.start_step = self.epoch, self.step
            bar = tqdm(
                loader, total=sampler.steps, initial=self.step, leave=False,
                desc=f"{settings.name} epoch {self.epoch + 1}/{settings.last_epoch}",
                disable=not (settings.progress and self.main),
            )  # fmt: skip
            for images, observed, index in bar:
                if max_steps is not None and taken >= max_steps:
                    self.read_pending()
                    return False
                self._train_step(images, observed, index)
                self.step, taken = self.step + 1, taken + 1
                if self.step % settings.log_every == 0:
                    self.read_pending()
                    bar.set_postfix(loss=f"{self.sums.loss / self.sums.steps:.3g}")
                # Under DDP the agreement on a stop signal is a collective with a host read: at the log_every steps.
                if (self.step % settings.log_every == 0 or not dist_utils.is_distributed()) and self.stop.requested():
                    bar.close()
                    self.stop.raise_after(checkpoint=True)
                every = settings.checkpoint_every
                if every and self.step % every == 0 and self.step < sampler.steps:
                    self.read_pending()
                    self.save_checkpoint()
            self.read_pending()
            bar.close()
            self._evaluate_epoch(time.perf_counter() - started)
            self.epoch, self.step, self.sums = self.epoch + 1, 0, EpochSums()
            self.save_checkpoint()
            if dist_utils.is_distributed():
                torch.distributed.barrier()
            if self.stop.requested():
                self.stop.raise_after(checkpoint=False)
        return True

    def close(self) -> None:
        """Stop the loaders' persistent workers: they ignore SIGTERM (see ``ignore_stop_signals``), so the
        interpreter's exit could not stop them, and would wait for them forever."""
        shutdown_workers(self.parts.loader)
        shutdown_workers(self.parts.val_loader)

    def finish(self) -> runfolder.Results:
        """Score the selected weights on the test split once and write ``results.json`` (main process)."""
        if not self.main:
            return {}
        parts, settings = self.parts, self.settings
        best_model = copy.deepcopy(self.model)
        self._publish_best()
        path = checkpoints.best_epoch_file(self.ckpt_dir, self.best["epoch"])
        load_weights(best_model, torch.load(path, map_location=self.device, weights_only=True)["model"], parts.spec,
                     str(path))  # fmt: skip
        test, train = parts.splits.test, parts.splits.train
        pred = self._predict(best_model, test, embeddings=settings.save_embeddings)
        results = runfolder.results_record(score(test.labels, pred["scores"], test.classes), self.best, self.rows)
        results["stopped_early"] = len(self.rows) < settings.last_epoch  # optim.early_stop ended it
        if settings.save_embeddings:
            runfolder.write_test_outputs(self.out, pred["embeddings"], pred["scores"], test.labels, test.classes)
            # The last epoch's model on its own training images: the scores label correction last acted on.
            seen = self._predict(self.model, train)
            runfolder.write_train_scores(self.out, seen["scores"], seen["observed"], train.labels, train.classes)
        runfolder.write_results(self.out, results)
        return results

    def _predict(self, model: nn.Module, dataset: Any, embeddings: bool = False) -> dict[str, Any]:
        settings = self.settings
        loader = eval_loader(dataset, self.parts.loader.batch_sampler.batch, 0, self.device)
        return predict(self.parts.runnable(model), loader, self.device, amp=settings.amp,
                       channels_last=settings.channels_last, embeddings=embeddings)  # fmt: skip


# ---------------------------------------------------------------------------------------------- one folder


def train(
    config: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
) -> runfolder.Results:
    """Train one run into ``out_dir`` and return its results (the content of ``results.json``).

    Every check that can refuse the call (another run in the folder, another configuration, a folder in use, a
    configuration that fails to load its data, an unreadable checkpoint) comes before the first file is written, so a
    refused call changes no file.

    Args:
        config: a resolved configuration (see :func:`clml_core.config.resolve_config`); None to resume with the
            folder's own ``config.yaml``.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` if it holds one (with its own configuration: ``config`` must be
            None or equal to it), from its newest readable checkpoint; start it if the folder holds no run.
        max_steps: stop after this many optimiser steps in this call, leaving the checkpoints as a crash would
            (for tests of resumption); the return value is then ``{}``.

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        ValueError: ``config`` differs from the folder's; a bad configuration or dataset.
        clml_core.runlock.FolderInUseError: another live process trains into ``out_dir``.
        clml_core.checkpoints.CheckpointError: the folder's checkpoints exist but none can be read.
        NonFiniteLossError: the loss became NaN or Inf.
        RunInterrupted: SIGTERM or SIGINT stopped the run (resume it to continue).
        clml_core.runio.DiskFullError: the disk filled up; every file already saved is intact.
    """
    out = Path(out_dir)
    with _owned(out, config, resume) as config:
        return _train_locked(config, out, max_steps)


@contextlib.contextmanager
def _owned(out: Path, config: TrainConfig | None, resume: bool) -> Iterator[TrainConfig]:
    """The configuration to train ``out`` with, while this process owns the folder: rank 0 checks the folder (before
    it or its lock is touched, and again under the lock) and holds its lock; the other ranks train with the same
    configuration. A refused or failed start leaves no empty folder behind."""
    if not dist_utils.is_main_process():
        yield runfolder.config_to_train(out, config, resume) if config is None else config
        return
    created = not out.exists()
    runfolder.config_to_train(out, config, resume)  # refuse early, before the folder or its lock is touched
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(out)
    except BaseException:
        if created:
            out.rmdir()
        raise
    try:
        if lock.stale_owner:
            print(f"clml: {lock.describe_stale()}", file=sys.stderr, flush=True)
        config = runfolder.config_to_train(out, config, resume)  # again, now that no other process can change it
        runfolder.remove_partial_writes(out)
        yield config
    finally:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _train_locked(config: TrainConfig, out: Path, max_steps: int | None) -> runfolder.Results:
    if runfolder.is_finished(out):  # finished (maybe killed just after): nothing left to do
        return runfolder.read_results(out)
    with StopSignals() as signals:
        parts = build_run(config)
        trainer = Trainer(parts, out, to_dict(config))
        signals.stop = trainer.stop
        try:
            return _continue(trainer, config, max_steps)
        finally:
            trainer.close()


def _continue(trainer: Trainer, config: TrainConfig, max_steps: int | None) -> runfolder.Results:
    """Continue ``trainer`` from its latest checkpoint to the end (or ``max_steps``) and score it."""
    latest = checkpoints.load_latest(trainer.ckpt_dir, map_location=trainer.device)
    if latest is not None:
        trainer.load_state_dict(*latest)
        if trainer.main:
            checkpoints.set_aside_unreadable(trainer.ckpt_dir, latest[1])
    if trainer.main:
        splits = trainer.parts.splits
        data = runfolder.data_record(config.data, splits.train, splits.val, splits.test)
        data.update(world_size=dist_utils.world_size(), device=str(trainer.device))
        where = {"checkpoint": str(latest[1]) if latest else None, "epoch": trainer.epoch, "step": trainer.step}
        runfolder.record_start(trainer.out, config, data, where)
    trainer.stop.stage = "training"
    finished = trainer.fit(max_steps)
    trainer.stop.stage = "testing"
    return trainer.finish() if finished else {}
