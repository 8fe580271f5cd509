"""`make demo`: the whole chain on this machine, with no AiCSD and no Docker.

Starts an MQTT broker (Mosquitto when installed, else amqtt from PyPI), the pipeline service
under `bentoml serve`, the bridge and a stand-in for AiCSD's job repository and task launcher,
all on loopback ports; publishes AiCSD jobs for a few sample images exactly as EdgeX does;
prints each job's outcome as AiCSD receives it; then stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .aicsd_standin import AicsdStandIn
from .servers import REPO, Bridge, Broker, broker_kind, publish, serve_bento, stop_process

CLASSIFIER, COUNTER = "ovms/efficientnet-lite0", "ovms/cell-counter"


def sample_images(folder: Path) -> list[tuple[Path, str]]:
    """Real photos from scikit-image in the formats instruments produce, plus one broken file, for
    a task of the classification pipeline; a synthetic fluorescence image for a task of the
    counting pipeline. Each with the pipeline its task was created with in AiCSD's web UI."""
    from skimage import data

    from .synthetic_blobs import make_image

    folder.mkdir(parents=True, exist_ok=True)
    cat, coffee = data.chelsea(), data.coffee()
    paths = [folder / "chelsea.jpg", folder / "coffee.png", folder / "chelsea-16bit.tiff",
             folder / "stack-2-pages.tiff", folder / "not-an-image.tiff"]
    Image.fromarray(cat).save(paths[0], quality=92)
    Image.fromarray(coffee).save(paths[1])
    tifffile.imwrite(paths[2], cat.astype(np.uint16) * 180 + 900, photometric="rgb")
    tifffile.imwrite(paths[3], np.stack([coffee[:300, :451], cat[:300, :451]]), photometric="rgb")
    paths[4].write_text("this file is not an image\n")
    cells = folder / "cells-16bit.tiff"
    tifffile.imwrite(cells, make_image(7, size=512, count=120).pixels)
    return [*((path, CLASSIFIER) for path in paths), (cells, COUNTER)]


def describe(results: str, status: str) -> str:
    if status != "PipelineComplete":
        return results
    try:
        data = json.loads(results)
        if "CellCount" in data:
            return f"{data['CellCount']} cells (task of {COUNTER})"
        top = data["top"]
    except (ValueError, KeyError, TypeError):
        return results
    return ", ".join(f"{t['label']} {t['score']:.2f}" for t in top[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo", help="where files, spool and logs go")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    files, logs = work / "files", work / "logs"
    (files / "output").mkdir(parents=True)
    logs.mkdir()
    images = sample_images(files / "input")
    kind = broker_kind(args.broker)

    started: list[object] = []
    failures = 0
    try:
        with AicsdStandIn() as aicsd:
            print(f"AiCSD stand-in   {aicsd.base_url}")
            broker = Broker(work / "broker", kind=kind).start()
            started.append(broker)
            print(f"MQTT broker      {kind} on 127.0.0.1:{broker.port}")
            service = serve_bento(
                "service:AicsdPipeline",
                env={
                    "PIPELINE_FILE_ROOTS": str(files),
                    "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
                    "PIPELINE_MODELS_DIR": str(REPO / "models"),
                    "PIPELINE_LEDGER": str(work / "ledger.sqlite3"),
                },
                cwd=REPO,
                log_path=logs / "service.log",
            )
            started.append(service)
            print(f"pipeline service {service.url} (Swagger UI there while the demo runs)")
            bridge = Bridge(work / "bridge", f"{service.url}/classify", broker.port,
                            client_id=f"demo-bridge-{uuid.uuid4().hex[:6]}").start()
            started.append(bridge)
            print(f"MQTT bridge      log in {bridge.log_path}\n")

            jobs = []
            for image, pipeline in images:
                job = aicsd.new_job(pipeline)  # a task created in AiCSD's web UI with this pipeline
                jobs.append((image, job))
                payload = {  # exactly what AiCSD publishes: no GatewayIP, the bridge adds it
                    "InputFileLocation": str(image),
                    "OutputFileFolder": str(files / "output"),
                    "ModelParams": {"Brightness": "0"},
                    "JobUpdateUrl": job.job_update_url,
                    "PipelineStatusUrl": job.pipeline_status_url,
                }
                publish(broker.port, [json.dumps(payload)])
            print(f"published {len(jobs)} jobs on mqtt-export/pipeline/params\n")
            for image, job in jobs:
                state = aicsd.wait_for_status(job.job_id, timeout=120)
                calls = " then ".join(f"{r.method} {r.status_code}" for r in aicsd.requests_for(job.job_id))
                print(f"{image.name:<22} {state.stored_status:<17} {describe(state.results, state.stored_status)}")
                print(f"{'':<22} AiCSD callbacks: {calls}")
                expected = "PipelineFailed" if image.name.startswith("not-an-image") else "PipelineComplete"
                failures += state.stored_status != expected
    except KeyboardInterrupt:
        print("interrupted")
        failures += 1
    finally:
        for server in reversed(started):
            if isinstance(server, (Bridge, Broker)):
                server.stop()
            else:
                stop_process(server.process)  # type: ignore[attr-defined]
        print(f"\nstopped everything; logs in {logs} and {work / 'bridge'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
