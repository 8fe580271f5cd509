"""Failure families of the pipeline side, each with a message fit for the AiCSD UI.

    PipelineError                 anything that ends a job as PipelineFailed
    ├── InputFileError            input file or output folder missing, outside the roots, wrong kind
    ├── ImageError                unreadable, corrupt, unsupported or too large image
    ├── ModelError                unknown model, model without files, model failed to load or run
    └── ParameterError            a ModelParams value that is not acceptable (names the key)

    JobRejected                   a request that cannot be run or reported at all (names the field);
                                  answered with HTTP 4xx and no callback is sent anywhere

    JobDeferred                   the job cannot be decided here and now; nothing is reported
    ├── AicsdUnreachable          AiCSD could not be asked (task launcher): answered 502, tried later
    └── NotServedHere             another service on the same topic serves the task's pipeline

    SettingsError                 bad service settings; stops start-up with every problem listed

The mapping of PipelineError to a PipelineFailed outcome lives in one place,
`serving.runner.PipelineRunner`.
"""

from __future__ import annotations

__all__ = [
    "AicsdUnreachable",
    "ImageError",
    "InputFileError",
    "JobDeferred",
    "JobRejected",
    "ModelError",
    "NotServedHere",
    "ParameterError",
    "PipelineError",
    "SettingsError",
]


class PipelineError(Exception):
    """A job failed; `str(error)` is shown to the user in the AiCSD UI."""


class InputFileError(PipelineError):
    """The job's input file or output folder is unusable."""


class ImageError(PipelineError):
    """The input file is not an image this service can read."""


class ModelError(PipelineError):
    """The requested model is unknown, empty, or failed to load or run."""


class ParameterError(PipelineError):
    """A ModelParams entry has a value the pipeline cannot use."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"ModelParams {key}: {problem}")
        self.key = key


class JobRejected(Exception):
    """The request itself is malformed or not allowed; names the offending field."""

    def __init__(self, field: str, problem: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.status_code = status_code


class JobDeferred(Exception):
    """The job cannot be decided here and now: no outcome is stored and AiCSD is told nothing."""


class AicsdUnreachable(JobDeferred):
    """AiCSD could not answer (unreachable, timed out, 5xx after the retries): try the job later."""


class NotServedHere(JobDeferred):
    """The task's pipeline is another service's (PIPELINE_SHARED_TOPIC): leave the job alone."""


class SettingsError(Exception):
    """One or more service settings are invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n  - " + "\n  - ".join(problems))
        self.problems = problems
