"""The command line of the training engine (:mod:`clml_core.engine`).

python -m clml_core.train --preset smoke --out runs/smoke [--config FILE.yaml] [section.field=value ...]
python -m clml_core.train --out runs/smoke --resume          # continue the run with the folder's own config.yaml
torchrun --nproc_per_node 4 -m clml_core.train --preset paper --out runs/coco data.root=/data/coco

Exit status: 0 when the run finished, 2 for an error (one line on stderr; ``--debug`` shows the traceback), 75
when SIGTERM or SIGINT stopped training after a checkpoint (run the same command with ``--resume`` to continue).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clml_core import distributed as dist_utils
from clml_core import runfolder
from clml_core.config import PRESETS, TrainConfig, apply_updates, parse_overrides, resolve_config
from clml_core.engine import EXIT_INTERRUPTED, RunInterrupted, train

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(EXIT_ERROR, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m clml_core.train",
        description="Train one CLML run. Overrides are section.field=value, e.g. clml.lam=0.5 optim.epochs=4.",
        epilog=f"Exit status: 0 done, {EXIT_ERROR} error, {EXIT_INTERRUPTED} stopped by SIGTERM/SIGINT after a "
        "checkpoint (rerun with --resume).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--config", default=None, help="a YAML file with the same sections as config.yaml")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its own config.yaml (start it if --out holds no run); a preset, "
        "--config or overrides given as well must agree with that configuration",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig | None:
    """The configuration the command line gives; None for a bare --resume (the engine reads the folder's)."""
    given = args.preset is not None or args.config is not None
    if args.resume and not given:
        saved = runfolder.read_config(Path(args.out))
        if saved is None:
            if args.overrides:
                raise ValueError(f"{args.out} holds no run to resume; give --preset or --config to start one")
            return None
        # Overrides on a bare --resume are checked against the folder's configuration (the engine refuses changes).
        return apply_updates(saved, parse_overrides(args.overrides)) if args.overrides else None
    return resolve_config(args.preset, args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line and train; errors propagate (see :func:`run` for the exit statuses)."""
    args = _parser().parse_args(argv)
    config = _config(args)
    dist_utils.setup_from_env()  # a no-op unless launched by torchrun with several processes
    try:
        results = train(config, args.out, resume=args.resume)
    finally:
        dist_utils.cleanup()
    if results:
        print(
            f"test mAP {results['test_map']:.2f}  best val mAP {results['best_val_map']:.2f} "
            f"(epoch {results['best_epoch']}, {results['best_variant']})  -> {args.out}"
        )
    return results


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1]  # re-raised from a DataLoader worker: its last line is the error itself
    return " ".join(lines) or type(error).__name__


def run(argv: Sequence[str] | None = None) -> int:
    """:func:`main` with every error as one line on stderr and an exit status (the traceback with --debug)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in arguments
    try:
        main(arguments)
    except RunInterrupted as stopped:
        print(f"clml: {_one_line(stopped)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        print("clml: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug:
            raise
        # Our errors say what and where; any other kind is named, since its message alone may not.
        kind = "" if isinstance(error, (ValueError, OSError, RuntimeError)) else f"{type(error).__name__}: "
        print(f"error: {kind}{_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(run())
