"""Writing a built model as an OpenVINO IR: model_info in rt_info, never a half-written file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import openvino as ov

__all__ = ["set_model_info", "write_ir"]

log = logging.getLogger(__name__)


def set_model_info(model: ov.Model, info: Mapping[str, str]) -> ov.Model:
    """Record `info` as rt_info `model_info` entries, the way OpenVINO Model API reads them."""
    for key, value in info.items():
        model.set_rt_info(value, ["model_info", key])
    return model


def write_ir(build: Callable[[], ov.Model], out_dir: Path, sources: Iterable[Path]) -> Path:
    """`out_dir/model.xml` (+ .bin), rebuilt only when older than any of `sources`."""
    target = out_dir / "model.xml"
    if (
        target.is_file()
        and target.with_suffix(".bin").is_file()
        and target.stat().st_mtime >= max(source.stat().st_mtime for source in sources)
    ):
        log.info("%s is up to date", target)
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".model-{os.getpid()}.xml"
    ov.save_model(build(), partial, compress_to_fp16=False)
    # The .bin first: a model.xml is never seen next to a half-written or missing .bin.
    os.replace(partial.with_suffix(".bin"), target.with_suffix(".bin"))
    os.replace(partial, target)
    log.info("wrote %s", target)
    return target
