"""Run a pipeline locally, with no service and no AiCSD, for pipeline authors.

    python -m pipeline run --model efficientnet-lite0 IMAGE [IMAGE ...] [--param TopK=3]
    python -m pipeline models
    python -m pipeline describe --model colour-boxes

Prints one JSON line per image with the status, QC flags, results and output files; `describe`
prints the pipeline kind serving a model and its declared parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aicsd.errors import PipelineError, SettingsError
from aicsd.job import ModelParams
from aicsd.logs import configure_logging
from serving.runner import PipelineRunner
from serving.settings import Settings

from .model_repository import ModelRepository


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, help="model repository (default: PIPELINE_MODELS_DIR or models)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline on image files")
    run.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    run.add_argument("--model", help="model directory name (default: PIPELINE_DEFAULT_MODEL)")
    run.add_argument("--output", type=Path, default=Path("."), help="folder for output files (default: .)")
    run.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                     help="a ModelParams entry, as typed in the AiCSD UI; repeatable")
    sub.add_parser("models", help="list the models in the repository")
    describe = sub.add_parser("describe", help="the pipeline kind serving a model and its parameters")
    describe.add_argument("--model", help="model directory name (default: PIPELINE_DEFAULT_MODEL)")
    describe.set_defaults(param=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(level="WARNING")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.models_dir is not None:
        settings = settings.model_copy(update={"models_dir": (args.models_dir,)})
    repository = ModelRepository(
        settings.models_dir, device=settings.device, performance_hint="LATENCY", cache_dir=settings.cache_dir
    )
    if args.command == "models":
        for entry in repository.discover():
            print(f"{entry.name}\tversion {entry.version}\t{entry.model_file or '(no model file)'}")
        return 0

    params = dict(args.param)
    if args.model:
        params["Model"] = args.model
    runner = PipelineRunner(settings, repository)
    try:
        pipeline = runner.pipeline(runner.model_name(ModelParams(params)))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "describe":
        print(json.dumps(pipeline.describe(), indent=2, ensure_ascii=False))
        return 0
    failures = 0
    for image in args.images:
        outcome = runner.run_local(image.absolute(), args.output.absolute(), ModelParams(params))
        failures += outcome.status != "PipelineComplete"
        print(json.dumps({
            "Image": str(image),
            "Status": outcome.status,
            "QCFlags": outcome.qc_flags,
            "Results": outcome.results,
            "OutputFiles": [str(f.path) for f in outcome.output_files],
        }, ensure_ascii=False), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
