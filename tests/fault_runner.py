"""The training command line with one injected fault, for tests/test_faults.py (not a test module itself).

python tests/fault_runner.py FAULT [arguments of python -m clml_core.train]

FAULT is one of
    none                    no fault
    kill-step:K             SIGKILL in the middle of this process's K-th training step
    term-step:K             SIGTERM in the middle of the K-th step (the engine finishes it and checkpoints)
    hold-step:K:PATH        before the K-th step, wait until the file PATH exists (at most 5 minutes): the run
                            holds its folder while another process tries it
    kill-write:K:PHASE      SIGKILL in the K-th file write of this process (every write is atomic), at PHASE:
                            before (nothing written yet), partial (half the temporary file), complete (the temporary
                            file complete, not yet renamed), rotated (a checkpoint's previous.pt updated, last.pt
                            not yet replaced), replaced (renamed into place, the folder not yet synced)
    enospc-write:K          the K-th write fails half-way with ENOSPC (a full disk)
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from clml_core import engine, runio
from clml_core import train as cli


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _at_step(kind: str, k: int, release: str) -> None:
    original, count = engine.Trainer._train_step, [0]

    def step(self, images, observed, index):
        count[0] += 1
        if count[0] == k:
            if kind == "kill-step":
                _kill()
            elif kind == "term-step":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                deadline = time.monotonic() + 300
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.05)
        return original(self, images, observed, index)

    engine.Trainer._train_step = step


def _at_write(k: int, phase: str) -> None:
    write, keep, sync = runio._write_new_file, runio._keep, runio._fsync_dir
    count, armed = [0], [False]

    def faulty_write(path, data):
        count[0] += 1
        armed[0] = count[0] == k
        if not armed[0]:
            return write(path, data)
        if phase == "before":
            _kill()
        if phase in ("partial", "enospc"):
            path.write_bytes(data[: len(data) // 2])
            if phase == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            _kill()
        write(path, data)
        if phase == "complete":
            _kill()

    def faulty_keep(path, previous):
        keep(path, previous)
        if armed[0] and phase == "rotated":
            _kill()

    def faulty_sync(folder):
        sync(folder)
        if armed[0] and phase == "replaced":
            _kill()

    runio._write_new_file, runio._keep, runio._fsync_dir = faulty_write, faulty_keep, faulty_sync


def main() -> int:
    fault, argv = sys.argv[1], sys.argv[2:]
    kind, *args = fault.split(":")
    if kind in ("kill-step", "term-step", "hold-step"):
        _at_step(kind, int(args[0]), ":".join(args[1:]))
    elif kind == "kill-write":
        _at_write(int(args[0]), args[1])
    elif kind == "enospc-write":
        _at_write(int(args[0]), "enospc")
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    return cli.run(argv)


if __name__ == "__main__":
    sys.exit(main())
