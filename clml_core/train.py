"""The command line of the training engine (:mod:`clml_core.engine`).

python -m clml_core.train --preset smoke --out runs/smoke [--resume] [--config FILE.yaml] [section.field=value ...]
torchrun --nproc_per_node 4 -m clml_core.train --preset paper --out runs/coco data.root=/data/coco
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from clml_core import distributed as dist_utils
from clml_core.config import PRESETS, resolve_config
from clml_core.engine import NonFiniteLossError, train


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m clml_core.train",
        description="Train one CLML run. Overrides are section.field=value, e.g. clml.lam=0.5 optim.epochs=4.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--config", default=None, help="a YAML file with the same sections as config.yaml")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    config = resolve_config(args.preset, args.config, args.overrides)
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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
