"""The AiCSD job: parsed and validated at the edge, then passed inward as one typed object.

`JobRequest` is the wire shape (what AiCSD publishes plus the bridge's `GatewayIP`); its
validation rejects what can never be run or reported (a missing field, a callback URL that is
not an AiCSD callback URL, two URLs naming different jobs). `Job.from_request` adds the
deployment's rules (allowed callback hosts). File rules are checked later, when the job runs,
because a job with a bad path can still be reported to AiCSD as `PipelineFailed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .callback_rules import CallbackUrl, host_allowed, parse_callback_url, task_url
from .errors import JobRejected, ParameterError
from .logs import shown

__all__ = [
    "MAX_BATCH",
    "SEED_EXAMPLE",
    "CallbackUrls",
    "Job",
    "JobRequest",
    "ModelParams",
]

MAX_BATCH = 64
"""Jobs one request to the service's batch API (`/classify_batch`) may carry: the service refuses
more, and the bridge's `bridge.batch` may not ask for more."""

SEED_EXAMPLE: dict[str, Any] = {
    "InputFileLocation": "/tmp/files/input/1.tiff",
    "OutputFileFolder": "/tmp/files/output",
    "ModelParams": {"Brightness": "0"},
    "JobUpdateUrl": "http://job-repository:59784/api/v1/job/pipeline/"
    "7c9fdbde-3b56-48af-a405-51d718cd9711/15c40f2d-68d2-4f09-9133-23f101b8b660",
    "PipelineStatusUrl": "http://task-launcher:59785/api/v1/pipelineStatus/"
    "7c9fdbde-3b56-48af-a405-51d718cd9711/15c40f2d-68d2-4f09-9133-23f101b8b660",
    "GatewayIP": "192.168.0.20",
}

class ModelParams(Mapping[str, str]):
    """The task's model parameters: a string map whose keys match case-insensitively.

    People type these in the AiCSD web UI, so `topk`, `TopK` and `TOPK` are the same key.
    """

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})
        self._folded = {k.casefold(): v for k, v in self._values.items()}

    def __getitem__(self, key: str) -> str:
        return self._folded[key.casefold()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.casefold() in self._folded

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ModelParams({self._values!r})"

    def text(self, key: str, default: str) -> str:
        """The value of `key` stripped, or `default` when it is absent or blank."""
        value = self._folded.get(key.casefold(), "").strip()
        return value or default

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        """A whole number in [minimum, maximum]; anything else is a `ParameterError` naming `key`."""
        return int(self._bounded(key, str(default), int, "a whole number", minimum, maximum))

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        """A finite number in [minimum, maximum]; anything else is a `ParameterError` naming `key`."""
        return self._bounded(key, repr(default), float, "a number", minimum, maximum)

    def _bounded(
        self, key: str, default: str, convert: Callable[[str], float], kind: str, minimum: float, maximum: float
    ) -> float:
        raw = self.text(key, default)
        try:
            value = convert(raw)
        except ValueError:
            raise ParameterError(key, f"must be {kind}, got {raw!r}") from None
        if not minimum <= value <= maximum:  # also refuses nan
            raise ParameterError(key, f"must be between {minimum:g} and {maximum:g}, got {raw}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices` (case-insensitive), returned in its canonical spelling."""
        raw = self.text(key, default)
        for option in choices:
            if raw.casefold() == option.casefold():
                return option
        raise ParameterError(key, f"must be one of {', '.join(choices)}, got {raw!r}")


class JobRequest(BaseModel):
    """An AiCSD job as it arrives on the wire: the five AiCSD fields plus `GatewayIP`."""

    model_config = ConfigDict(
        extra="ignore",
        title="AiCSD job",
        json_schema_extra={"example": SEED_EXAMPLE},
    )

    # Lengths: Linux's PATH_MAX for paths, a host name's 253 characters for the gateway address.
    InputFileLocation: str = Field(min_length=1, max_length=4096, description="Absolute path of the job's input file")
    OutputFileFolder: str = Field(
        min_length=1, max_length=4096, description="Absolute path of the folder for output files"
    )
    ModelParams: dict[str, str] | None = Field(
        default=None, description="Task parameters typed in the AiCSD UI, e.g. Model, TopK, MinConfidence"
    )
    JobUpdateUrl: str = Field(description="AiCSD job repository URL: PUT the job update here first")
    PipelineStatusUrl: str = Field(description="AiCSD task launcher URL: POST the status here second")
    GatewayIP: str = Field(default="", max_length=253, description="Gateway address, added by the MQTT bridge")

    @field_validator("ModelParams", mode="before")
    @classmethod
    def _scalars_as_strings(cls, value: Any) -> Any:
        """Accept numbers and booleans typed as JSON scalars; refuse nested values."""
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(item, bool):
                out[key] = "true" if item else "false"
            elif isinstance(item, (int, float)):
                out[key] = str(item)
            elif item is None or isinstance(item, str):
                out[key] = "" if item is None else item
            else:
                raise ValueError(f"value of {key!r} must be a string, got {type(item).__name__}")
        return out

    @field_validator("JobUpdateUrl", "PipelineStatusUrl")
    @classmethod
    def _callback_url(cls, value: str, info: ValidationInfo) -> str:
        """Only a URL AiCSD itself would publish (see `aicsd.callback_rules`)."""
        value = value.strip()
        parse_callback_url(value, info.field_name or "")
        return value

    @model_validator(mode="after")
    def _same_job(self) -> JobRequest:
        update, status = self.callback_urls()
        if (update.job_id, update.task_id) != (status.job_id, status.task_id):
            raise ValueError(
                f"JobUpdateUrl names job {update.job_id}/task {update.task_id} but PipelineStatusUrl names "
                f"job {status.job_id}/task {status.task_id}: both must name the same job and task"
            )
        return self

    def callback_urls(self) -> tuple[CallbackUrl, CallbackUrl]:
        """The two callback URLs, parsed: (JobUpdateUrl, PipelineStatusUrl)."""
        return (parse_callback_url(self.JobUpdateUrl, "JobUpdateUrl"),
                parse_callback_url(self.PipelineStatusUrl, "PipelineStatusUrl"))


@dataclass(frozen=True)
class CallbackUrls:
    """Where AiCSD wants to hear about one job, and which job that is."""

    job_id: str
    task_id: str
    job_update: str
    pipeline_status: str

    @property
    def task(self) -> str:
        """The task launcher's GET /api/v1/task/<taskid>, which names the task's pipeline (contract section 1)."""
        return task_url(self.pipeline_status)


@dataclass(frozen=True)
class Job:
    """A validated job, ready to run: typed paths, parameters and callback URLs."""

    callbacks: CallbackUrls
    input_file: Path
    output_folder: Path
    params: ModelParams
    gateway_ip: str
    sent_output_folder: str = ""
    """`OutputFileFolder` exactly as AiCSD sent it (a trailing '/' kept), when it differs in spelling."""

    @property
    def output_dir_name(self) -> str:
        """The output folder as AiCSD spelled it: what each output file's DirName must say."""
        return self.sent_output_folder or str(self.output_folder)

    @property
    def job_id(self) -> str:
        return self.callbacks.job_id

    @property
    def task_id(self) -> str:
        return self.callbacks.task_id

    @property
    def key(self) -> tuple[str, str]:
        return (self.callbacks.job_id, self.callbacks.task_id)

    @classmethod
    def from_request(cls, request: JobRequest, allowed_hosts: frozenset[str]) -> Job:
        """Apply the deployment's callback-host rule; raise `JobRejected` naming the field."""
        update, status = request.callback_urls()
        for field, url in (("JobUpdateUrl", update), ("PipelineStatusUrl", status)):
            if not host_allowed(url, allowed_hosts):
                raise JobRejected(
                    field,
                    f"callback host '{shown(url.netloc)}' is not allowed; add it to "
                    "PIPELINE_CALLBACK_HOSTS if AiCSD really lives there",
                )
        return cls(
            callbacks=CallbackUrls(update.job_id, update.task_id, update.url, status.url),
            input_file=Path(request.InputFileLocation),
            output_folder=Path(request.OutputFileFolder),
            sent_output_folder=request.OutputFileFolder,
            params=ModelParams(request.ModelParams),
            gateway_ip=request.GatewayIP,
        )
