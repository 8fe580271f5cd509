"""Our classifier against openvino-model-api's on EfficientNet-Lite0: the pipeline alone, same run.

    .venv/bin/python -m bench.classifier_paths [--images 300] [--threads 1]

Both run the same IR on the same 512x512 JPEGs (made from scikit-image's photos) through a
pipeline's `run` (decode, inference, Results), in this process, alternating in rounds so that
drift on a shared machine hits both alike. Prints jobs/s and CPU ms per job (process time).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aicsd.job import ModelParams
from pipeline.base import PipelineTask
from pipeline.classification import ClassificationPipeline
from pipeline.model_api import ModelApiModel, ModelApiPipeline
from pipeline.model_repository import ModelRepository

REPO = Path(__file__).resolve().parent.parent


def _images(folder: Path, count: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((512, 512))
               for name in ("chelsea", "coffee", "astronaut", "rocket")]
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        sources[i % len(sources)].save(path, quality=90)
        paths.append(path)
    return paths


def _measure(pipeline, tasks: list[PipelineTask], threads: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for task in tasks:
            pipeline.run(task)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(pipeline.run, tasks))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(tasks) / wall, cpu / len(tasks) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    repository = ModelRepository(REPO / "models", performance_hint="THROUGHPUT", cache_dir=None)
    ours = ClassificationPipeline(repository.get("efficientnet-lite0"), max_pixels=100_000_000)
    entry, entries = repository.describe("efficientnet-lite0")
    assert entry.model_file is not None
    library = ModelApiPipeline(ModelApiModel(entry.name, entry.model_file, entries, core=repository.core),
                               max_pixels=100_000_000)
    log = logging.LoggerAdapter(logging.getLogger("bench"), {})
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [PipelineTask.local(p, Path(tmp), ModelParams({}), log) for p in _images(Path(tmp), args.images)]
        for pipeline in (ours, library):
            pipeline.warm_up()
            _measure(pipeline, tasks[:20], args.threads)
        figures: dict[str, list[tuple[float, float]]] = {"ours": [], "library": []}
        for _ in range(args.rounds):
            figures["ours"].append(_measure(ours, tasks, args.threads))
            figures["library"].append(_measure(library, tasks, args.threads))
    print(f"{args.images} JPEG 512x512, {args.threads} thread(s), {args.rounds} alternating rounds")
    for name, rows in figures.items():
        rates = ", ".join(f"{r:.1f}" for r, _ in rows)
        cpus = ", ".join(f"{c:.2f}" for _, c in rows)
        print(f"  {name:8} jobs/s {rates}   CPU ms/job {cpus}")


if __name__ == "__main__":
    main()
