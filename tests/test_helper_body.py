"""The job-update body: exactly the shape AiCSD's job repository handler accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aicsd.outcome import OutputFile, PipelineOutcome
from helper import CallbackAnswer, CallbackReport, RetryPolicy, create_inference_response, job_update_body


def test_complete_outcome_body_has_string_fields_and_an_array_of_output_files():
    outcome = PipelineOutcome.complete(
        '{"CellCount":3}', qc_flags="Saturated", output_files=(OutputFile(Path("/tmp/files/output/a-counted.tiff")),)
    )
    body = job_update_body(outcome)
    assert body == {
        "Status": "PipelineComplete",
        "QCFlags": "Saturated",
        "OutputFiles": [
            {
                "DirName": "/tmp/files/output",
                "Name": "a-counted.tiff",
                "Extension": ".tiff",
                "Status": "",
                "ErrorDetails": None,
                "Owner": "",
            }
        ],
        "Results": '{"CellCount":3}',
    }
    assert json.loads(json.dumps(body)) == body


def test_failed_outcome_body_has_no_flags_no_files_and_the_reason_as_results():
    body = job_update_body(PipelineOutcome.failed("InputFileLocation '/x' does not exist"))
    assert body == {
        "Status": "PipelineFailed",
        "QCFlags": "",
        "OutputFiles": [],
        "Results": "InputFileLocation '/x' does not exist",
    }


def test_seed_name_create_inference_response_serialises_mapping_results_compactly():
    body = create_inference_response({"top": [{"label": "cat"}]}, "PipelineComplete", output_files=["/o/x.png"])
    assert body["Results"] == '{"top":[{"label":"cat"}]}'
    assert isinstance(body["OutputFiles"], list) and body["OutputFiles"][0]["Extension"] == ".png"


@pytest.mark.parametrize("extension", ["tiff", ".tiff", ""])
def test_create_inference_response_puts_the_dot_on_an_extension_given_without_it(extension):
    given = {"DirName": "/tmp/files/output", "Name": "1-tiffany.tiff", "Extension": extension}
    body = create_inference_response("x", output_files=[Path("/tmp/files/output/a.png"), given])
    assert [(f["Name"], f["Extension"]) for f in body["OutputFiles"]] == [("a.png", ".png"), ("1-tiffany.tiff", ".tiff")]
    assert body["OutputFiles"][1] == {
        "DirName": "/tmp/files/output", "Name": "1-tiffany.tiff", "Extension": ".tiff",
        "Status": "", "ErrorDetails": None, "Owner": "",
    }


def test_output_file_in_a_folder_keeps_the_folder_as_given():
    output = OutputFile.in_folder("/tmp/files/linked-output", "a-counted.tiff")
    entry = job_update_body(PipelineOutcome.complete("{}", output_files=(output,)))["OutputFiles"][0]
    assert (entry["DirName"], entry["Name"], entry["Extension"]) == ("/tmp/files/linked-output", "a-counted.tiff", ".tiff")


def test_seed_name_create_inference_response_refuses_an_unknown_status():
    with pytest.raises(ValueError, match="PipelineComplete or PipelineFailed"):
        create_inference_response("x", "Done")


def test_default_retry_policy_is_five_tries_over_about_thirty_seconds():
    policy = RetryPolicy()
    waits = [policy.wait_before(n) for n in range(1, policy.tries + 1)]
    assert waits == [0, 2, 4, 8, 16] and sum(waits) == 30


@pytest.mark.parametrize(
    "code, retryable", [(None, True), (500, True), (503, True), (400, False), (404, False), (200, False)]
)
def test_only_unreachable_and_server_errors_are_retryable(code, retryable):
    assert CallbackAnswer("u", code, "", 1).retryable is retryable


def test_report_is_delivered_only_when_both_callbacks_were_accepted():
    ok, bad = CallbackAnswer("u", 200, "", 1), CallbackAnswer("u", 500, "", 5)
    assert CallbackReport(ok, ok).delivered
    assert not CallbackReport(ok, bad).delivered and CallbackReport(ok, bad).retryable
    assert not CallbackReport(bad, None).delivered and CallbackReport(bad, None).retryable
