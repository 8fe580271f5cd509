"""Build the bundled models into an OVMS-layout model repository.

    python -m model_builders [--models-dir models] [--only NAME]

Each builder skips its work when its output is newer than its inputs, so `make models` is quick
when nothing changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .cell_counter import write_cell_counter
from .efficientnet_lite import write_efficientnet_lite0

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "efficientnet-lite0": write_efficientnet_lite0,
    "cell-counter": write_cell_counter,
}
"""Model directory name -> builder writing its version 1 into the directory it is given."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_builders", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="the model repository (default: models)"
    )
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build just this model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = [args.only] if args.only else list(BUILDERS)
    for name in names:
        try:
            BUILDERS[name](args.models_dir / name / "1")
        except Exception as exc:  # one clear line instead of a traceback for a build step
            print(f"error: building {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
