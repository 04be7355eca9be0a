"""Stopping a run on a signal, the way Lightning and torchrun do.

SIGTERM or SIGINT during training lets the current step finish (under DDP: the next step that logs, when the ranks
agree), writes a checkpoint and raises :class:`RunInterrupted` (the command line exits with
:data:`EXIT_INTERRUPTED`); a second SIGINT stops at once, with the previous checkpoint kept, while a repeated SIGTERM
(a launcher forwarding the scheduler's) is ignored. Before training starts and while the test split is scored, the
first signal stops at once: nothing of the run is lost there, since every file is written atomically.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from clml_core import checkpoints
from clml_core import distributed as dist_utils

#: Exit status of the command line when a signal stopped training after a checkpoint (EX_TEMPFAIL: run it again).
EXIT_INTERRUPTED = 75

_WHERE = {"setup": "before training", "training": "during training", "testing": "while testing"}


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run; what was trained is checkpointed and ``--resume`` continues it.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopState:
    """A trainer's stop signal and stage (setup | training | testing).

    Args:
        trainer: the :class:`~clml_core.engine.Trainer` (its epoch, step, checkpoint writer and device).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.signal: int | None = None  # the first stop signal received
        self.stage = "setup"

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Signal handler: while training, the first signal stops the run after the current step and a second SIGINT
        (Ctrl-C twice) stops it at once; a repeated SIGTERM changes nothing. Outside training every signal stops at
        once."""
        name, trainer = signal.Signals(signum).name, self.trainer
        if self.stage == "training" and self.signal is not None and signum != signal.SIGINT:
            return
        if self.signal is not None or self.stage != "training":
            self.signal = signum
            last = trainer.last_checkpoint_text()
            raise RunInterrupted(
                signum,
                f"stopped by {name} {_WHERE[self.stage]} (epoch {trainer.epoch} step {trainer.step}); every file saved "
                f"so far is intact ({last[0].lower()}{last[1:]}); continue with --resume (resume=True)",
            )
        self.signal = signum
        if trainer.main:
            again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            print(f"clml: {name}: finishing this step and writing a checkpoint{again}", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether a stop signal arrived, agreed by every rank (so all ranks stop after the same step)."""
        if not dist_utils.is_distributed():
            return self.signal is not None
        flag = torch.tensor([self.signal or 0], device=self.trainer.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signal = int(flag.item()) or None
        return self.signal is not None

    def raise_after(self, checkpoint: bool) -> None:
        """Stop the run: write a checkpoint first when the step that ran since the last one is not in it."""
        trainer = self.trainer
        if checkpoint:
            trainer.read_pending()
            trainer.save_checkpoint()
            if dist_utils.is_distributed():
                torch.distributed.barrier()
        raise RunInterrupted(
            self.signal,
            f"stopped by {signal.Signals(self.signal).name} at epoch {trainer.epoch} step {trainer.step}; checkpoint "
            f"written to {trainer.ckpt_dir / checkpoints.LAST}; continue with --resume (resume=True)",
        )


class StopSignals:
    """SIGTERM and SIGINT go to ``stop.on_signal`` while the block runs (in the main thread only).

    Before a trainer's :class:`StopState` is set (the data is loading) a signal stops at once: nothing was written.
    """

    def __init__(self) -> None:
        self.stop: StopState | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop is not None:
            self.stop.on_signal(signum, frame)
            return
        name = signal.Signals(signum).name
        raise RunInterrupted(signum, f"stopped by {name} while the data was loading; nothing was trained or written")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
