"""The reference demo's helper functions for pipeline authors, on top of `aicsd.callbacks`.

AiCSD callbacks: the job update (PUT, always first), then the pipeline status (POST, second).
`create_inference_response` builds the job-update body, `send_pipeline_inference_results` PUTs
it and `send_pipeline_status` POSTs the status, with the retries and the body shape of
`aicsd.callbacks` (the shape AiCSD's handlers accept, not its prose docs).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aicsd.callbacks import AicsdClient, CallbackAnswer, CallbackReport, RetryPolicy, job_update_body
from aicsd.outcome import COMPLETE, FAILED, OutputFile, PipelineOutcome

__all__ = [
    "AicsdClient",
    "CallbackAnswer",
    "CallbackReport",
    "RetryPolicy",
    "create_inference_response",
    "job_update_body",
    "send_pipeline_inference_results",
    "send_pipeline_status",
]


_default_client: AicsdClient | None = None
_default_lock = threading.Lock()


def _client() -> AicsdClient:
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = AicsdClient()
        return _default_client


def create_inference_response(
    results: str | Mapping[str, Any],
    pipelineStatus: str = COMPLETE,
    qc_flags: str = "",
    output_files: Iterable[str | Path | Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The job-update body for a pipeline's results (a string, or a mapping sent as compact JSON).

    Each output file is a path, or a mapping of AiCSD's OutputFile fields (`DirName`, `Name`,
    `Extension`, ...). `Extension` always carries its dot (".tiff"): AiCSD's file sender names
    the web UI's copy by replacing it with ".jpeg", so "tiff" would give "a..jpeg".
    """
    if pipelineStatus not in (COMPLETE, FAILED):
        raise ValueError(f"pipelineStatus must be {COMPLETE} or {FAILED}, got {pipelineStatus!r}")
    text = results if isinstance(results, str) else json.dumps(results, separators=(",", ":"))
    items = list(output_files)
    files = tuple(OutputFile(Path(p)) for p in items if not isinstance(p, Mapping))
    body = job_update_body(PipelineOutcome(pipelineStatus, qc_flags=qc_flags, output_files=files, results=text))
    from_paths = iter(body["OutputFiles"])
    body["OutputFiles"] = [_file_entry(p) if isinstance(p, Mapping) else next(from_paths) for p in items]
    return body


def _file_entry(given: Mapping[str, Any]) -> dict[str, Any]:
    """An OutputFile entry from a caller's mapping: AiCSD's defaults, and the dot on `Extension`."""
    entry: dict[str, Any] = {
        "DirName": "", "Name": "", "Extension": "", "Status": "", "ErrorDetails": None, "Owner": "",
    }
    entry.update(given)
    name = str(entry["Name"])
    extension = str(entry["Extension"] or Path(name).suffix)
    entry["Extension"] = extension if not extension or extension.startswith(".") else f".{extension}"
    return entry


def send_pipeline_inference_results(
    jobUpdateUrl: str, inferenceResults: Mapping[str, Any], gatewayIP: str = ""
) -> CallbackAnswer:
    """PUT a job-update body (from `create_inference_response`) to AiCSD's job repository."""
    return _client().put_job_update(jobUpdateUrl, inferenceResults)


def send_pipeline_status(pipelineStatusUrl: str, pipelineStatus: str, gatewayIP: str = "") -> CallbackAnswer:
    """POST `PipelineComplete` or `PipelineFailed` to AiCSD's task launcher; call after the job update."""
    return _client().post_status(pipelineStatusUrl, pipelineStatus)
