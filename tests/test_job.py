"""Parsing an AiCSD job at the edge: what is accepted, what is rejected and how it is named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from aicsd.errors import InputFileError, JobRejected, ParameterError
from aicsd.job import SEED_EXAMPLE, Job, JobRequest, ModelParams
from serving.files import resolve_inside

ALLOWED = frozenset({"job-repository", "task-launcher", "localhost", "127.0.0.1"})
JOB_ID = "7c9fdbde-3b56-48af-a405-51d718cd9711"
TASK_ID = "15c40f2d-68d2-4f09-9133-23f101b8b660"


def seed(**changes: object) -> dict:
    body = copy.deepcopy(SEED_EXAMPLE)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def error_fields(exc: ValidationError) -> set[str]:
    return {str(e["loc"][0]) if e["loc"] else "" for e in exc.errors()}


def test_seed_request_is_accepted_as_written_and_names_its_job_and_task():
    job = Job.from_request(JobRequest.model_validate(SEED_EXAMPLE), ALLOWED)
    assert (job.job_id, job.task_id) == (JOB_ID, TASK_ID)
    assert job.input_file == Path("/tmp/files/input/1.tiff")
    assert job.output_folder == Path("/tmp/files/output")
    assert job.gateway_ip == "192.168.0.20"
    assert job.params["Brightness"] == "0"


def test_message_without_gateway_ip_as_aicsd_publishes_it_is_accepted():
    request = JobRequest.model_validate(seed(GatewayIP=None))
    assert request.GatewayIP == ""


@pytest.mark.parametrize("params", [None, {}, "absent"])
def test_model_params_may_be_missing_empty_or_null(params):
    body = seed(ModelParams=None) if params == "absent" else {**seed(), "ModelParams": params}
    job = Job.from_request(JobRequest.model_validate(body), ALLOWED)
    assert len(job.params) == 0


def test_model_params_numbers_typed_as_json_numbers_become_strings():
    request = JobRequest.model_validate(seed(ModelParams={"TopK": 3, "MinConfidence": 0.5, "Flag": True}))
    assert request.ModelParams == {"TopK": "3", "MinConfidence": "0.5", "Flag": "true"}


def test_model_params_that_is_not_a_map_is_rejected_naming_the_field():
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(ModelParams=["TopK", "3"]))
    assert error_fields(info.value) == {"ModelParams"}


def test_nested_model_params_value_is_rejected_naming_the_key():
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(ModelParams={"Model": {"name": "x"}}))
    assert "Model" in str(info.value) and error_fields(info.value) == {"ModelParams"}


@pytest.mark.parametrize("field", ["InputFileLocation", "OutputFileFolder", "JobUpdateUrl", "PipelineStatusUrl"])
def test_each_required_field_missing_is_named(field):
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(**{field: None}))
    assert field in error_fields(info.value)


def test_field_of_wrong_json_type_is_named():
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate({**seed(), "InputFileLocation": 17})
    assert error_fields(info.value) == {"InputFileLocation"}


@pytest.mark.parametrize(
    "url, problem",
    [
        ("ftp://job-repository:59784/api/v1/job/pipeline/a/b", "http or https"),
        ("job-repository:59784/api/v1/job/pipeline/a/b", "http or https"),
        ("http:///api/v1/job/pipeline/a/b", "no host"),
        ("http://job-repository:99999/api/v1/job/pipeline/a/b", "invalid port"),
        ("http://job-repository:59784/api/v1/job/a/b", "exactly the path"),
        ("http://job-repository:59784/api/v1/job/pipeline/a", "exactly the path"),
        ("http://user:pw@job-repository:59784/api/v1/job/pipeline/a/b", "credentials"),
        ("http://127.0.0.1:59784/admin/delete-everything/api/v1/job/pipeline/a/b?cmd=drop", "no query"),
        ("http://127.0.0.1:59784/admin/delete-everything/api/v1/job/pipeline/a/b", "exactly the path"),
        ("http://job-repository:59784/api/v1/job/pipeline/a\u20ac/b", "not ASCII"),
    ],
)
def test_malformed_job_update_url_is_rejected_with_the_reason(url, problem):
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(JobUpdateUrl=url))
    assert "JobUpdateUrl" in error_fields(info.value)
    assert problem in str(info.value)


def test_callback_url_with_surrounding_spaces_is_kept_without_them():
    request = JobRequest.model_validate(seed(JobUpdateUrl=f" {SEED_EXAMPLE['JobUpdateUrl']}\n"))
    assert request.JobUpdateUrl == SEED_EXAMPLE["JobUpdateUrl"]


def test_a_job_knows_its_task_launcher_task_url():
    job = Job.from_request(JobRequest.model_validate(SEED_EXAMPLE), ALLOWED)
    assert job.callbacks.task == f"http://task-launcher:59785/api/v1/task/{TASK_ID}"


def test_status_url_pointing_at_the_job_repository_path_is_rejected():
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(PipelineStatusUrl=SEED_EXAMPLE["JobUpdateUrl"]))
    assert "PipelineStatusUrl" in error_fields(info.value)


def test_urls_naming_different_jobs_are_rejected():
    other = SEED_EXAMPLE["PipelineStatusUrl"].replace(TASK_ID, "00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(seed(PipelineStatusUrl=other))
    assert "same job and task" in str(info.value)


@pytest.mark.parametrize("field", ["JobUpdateUrl", "PipelineStatusUrl"])
def test_callback_host_not_in_the_allow_list_is_rejected_naming_the_field(field):
    body = seed()
    body[field] = body[field].replace("job-repository", "169.254.169.254").replace("task-launcher", "169.254.169.254")
    with pytest.raises(JobRejected) as info:
        Job.from_request(JobRequest.model_validate(body), ALLOWED)
    assert info.value.field == field
    assert "PIPELINE_CALLBACK_HOSTS" in str(info.value)


def test_allow_list_entry_for_ipv6_in_brackets_admits_the_job():
    body = seed(JobUpdateUrl=SEED_EXAMPLE["JobUpdateUrl"].replace("job-repository", "[::1]"),
                PipelineStatusUrl=SEED_EXAMPLE["PipelineStatusUrl"].replace("task-launcher", "[::1]"))
    job = Job.from_request(JobRequest.model_validate(body), frozenset({"[::1]"}))
    assert job.callbacks.job_update.startswith("http://[::1]:59784/")


def test_allow_list_entry_with_port_admits_only_that_port():
    allowed = frozenset({"job-repository:59784", "task-launcher:59785"})
    Job.from_request(JobRequest.model_validate(SEED_EXAMPLE), allowed)
    body = seed(JobUpdateUrl=SEED_EXAMPLE["JobUpdateUrl"].replace("59784", "8080"))
    with pytest.raises(JobRejected):
        Job.from_request(JobRequest.model_validate(body), allowed)


def test_star_allows_any_callback_host():
    body = seed(JobUpdateUrl=SEED_EXAMPLE["JobUpdateUrl"].replace("job-repository", "elsewhere"))
    Job.from_request(JobRequest.model_validate(body), frozenset({"*"}))


def test_model_params_keys_match_case_insensitively():
    params = ModelParams({"topk": "3", "MODEL": "x"})
    assert params.integer("TopK", 5, minimum=1, maximum=10) == 3
    assert params.text("Model", "default") == "x"
    assert params.text("Missing", "default") == "default"


@pytest.mark.parametrize("raw, problem", [("three", "whole number"), ("0", "between 1 and 10"), ("11", "between")])
def test_bad_integer_param_names_the_key_and_the_problem(raw, problem):
    with pytest.raises(ParameterError) as info:
        ModelParams({"TopK": raw}).integer("TopK", 5, minimum=1, maximum=10)
    assert str(info.value).startswith("ModelParams TopK:") and problem in str(info.value)


def test_bad_number_param_is_refused():
    with pytest.raises(ParameterError, match="MinConfidence"):
        ModelParams({"MinConfidence": "high"}).number("MinConfidence", 0.2, minimum=0, maximum=1)
    with pytest.raises(ParameterError, match="between"):
        ModelParams({"MinConfidence": "nan"}).number("MinConfidence", 0.2, minimum=0, maximum=1)


class TestFileRules:
    def test_file_inside_a_root_resolves(self, tmp_path):
        image = tmp_path / "in.png"
        image.write_bytes(b"x")
        assert resolve_inside(image, (tmp_path,), "InputFileLocation", want_dir=False) == image.resolve()

    def test_missing_file_is_named(self, tmp_path):
        with pytest.raises(InputFileError, match="InputFileLocation .* does not exist"):
            resolve_inside(tmp_path / "nope.tiff", (tmp_path,), "InputFileLocation", want_dir=False)

    def test_relative_path_is_refused(self, tmp_path):
        with pytest.raises(InputFileError, match="absolute"):
            resolve_inside(Path("in.png"), (tmp_path,), "InputFileLocation", want_dir=False)

    def test_file_outside_the_roots_is_refused(self, tmp_path):
        root, outside = tmp_path / "root", tmp_path / "outside.png"
        root.mkdir()
        outside.write_bytes(b"x")
        with pytest.raises(InputFileError, match="outside the allowed file roots"):
            resolve_inside(outside, (root,), "InputFileLocation", want_dir=False)

    def test_symlink_inside_a_root_pointing_outside_is_refused(self, tmp_path):
        root, secret = tmp_path / "root", tmp_path / "secret.png"
        root.mkdir()
        secret.write_bytes(b"x")
        (root / "link.png").symlink_to(secret)
        with pytest.raises(InputFileError, match="outside"):
            resolve_inside(root / "link.png", (root,), "InputFileLocation", want_dir=False)

    def test_dot_dot_escape_is_refused(self, tmp_path):
        root = tmp_path / "root"
        root.mkdir()
        (tmp_path / "x.png").write_bytes(b"x")
        with pytest.raises(InputFileError, match="outside"):
            resolve_inside(root / ".." / "x.png", (root,), "InputFileLocation", want_dir=False)

    def test_directory_given_as_input_file_is_refused(self, tmp_path):
        with pytest.raises(InputFileError, match="not a regular file"):
            resolve_inside(tmp_path, (tmp_path,), "InputFileLocation", want_dir=False)

    def test_file_given_as_output_folder_is_refused(self, tmp_path):
        image = tmp_path / "in.png"
        image.write_bytes(b"x")
        with pytest.raises(InputFileError, match="OutputFileFolder .* not a directory"):
            resolve_inside(image, (tmp_path,), "OutputFileFolder", want_dir=True)
