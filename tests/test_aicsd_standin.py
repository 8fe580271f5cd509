"""The AiCSD stand-in rejects what AiCSD's handlers reject, so a lax test server hides nothing."""

from __future__ import annotations

import http.client as httpclient
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from devtools.aicsd_standin import AicsdStandIn, ContractError, parse_job_update

GOOD = {
    "Status": "PipelineComplete",
    "QCFlags": "",
    "OutputFiles": [],
    "Results": "CellCount,25",
}


@pytest.fixture
def standin() -> Iterator[AicsdStandIn]:
    with AicsdStandIn() as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield client


def post_status(http: httpx.Client, url: str, body: str) -> httpx.Response:
    return http.post(url, content=body.encode(), headers={"Content-Type": "text/plain"})


def test_well_formed_update_then_status_completes_the_job(standin, http):
    job = standin.new_job()
    assert http.put(job.job_update_url, json=GOOD).status_code == 200
    assert post_status(http, job.pipeline_status_url, "PipelineComplete").status_code == 200
    state = standin.wait_for_status(job.job_id, timeout=1)
    assert state.ended == "complete" and state.published_results == ["CellCount,25"]


def test_status_before_any_job_update_is_rejected(standin, http):
    job = standin.new_job()
    assert post_status(http, job.pipeline_status_url, "PipelineComplete").status_code == 400
    assert standin.job(job.job_id).ended is None


def test_status_that_differs_from_the_stored_one_is_rejected(standin, http):
    job = standin.new_job()
    http.put(job.job_update_url, json={**GOOD, "Status": "PipelineFailed"})
    assert post_status(http, job.pipeline_status_url, "PipelineComplete").status_code == 400


def test_chunked_job_update_without_content_length_is_rejected(standin):
    job = standin.new_job()
    parts = urlsplit(job.job_update_url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("PUT", parts.path, body=iter([b'{"Status":', b'"PipelineComplete"}']),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert standin.job(job.job_id).puts == 0


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "OutputFiles": "[{\"DirName\": \"/tmp\"}]"},
        {**GOOD, "OutputFiles": [{"Name": "a.tiff", "ErrorDetails": "boom"}]},
        {**GOOD, "QCFlags": 3},
        {**GOOD, "Results": {"CellCount": 25}},
        {**GOOD, "OutputFiles": [{"Name": 7}]},
    ],
    ids=["OutputFiles-string", "ErrorDetails-string", "QCFlags-number", "Results-object", "Name-number"],
)
def test_field_of_the_wrong_json_type_fails_with_500(standin, http, body):
    job = standin.new_job()
    assert http.put(job.job_update_url, json=body).status_code == 500


def test_body_that_is_not_json_fails_with_500(standin, http):
    job = standin.new_job()
    assert http.put(job.job_update_url, content=b"Status=PipelineComplete").status_code == 500


def test_error_details_object_and_case_insensitive_names_are_accepted(standin, http):
    job = standin.new_job()
    body = {"status": "PipelineComplete", "OUTPUTFILES": [{"dirname": "/x", "Name": "a", "ErrorDetails":
                                                            {"Owner": "pipeline", "Error": "bad"}}], "Extra": 1}
    assert http.put(job.job_update_url, json=body).status_code == 200
    assert standin.job(job.job_id).output_files[0]["errordetails"] == {"owner": "pipeline", "error": "bad"}


@pytest.mark.parametrize("status", ["Done", "pipelinecomplete", ""])
def test_job_update_status_must_be_exactly_a_pipeline_status(standin, http, status):
    job = standin.new_job()
    assert http.put(job.job_update_url, json={**GOOD, "Status": status}).status_code == 400


def test_unknown_job_and_task_mismatch_are_rejected(standin, http):
    job = standin.new_job()
    assert http.put(job.job_update_url.replace(job.job_id, "nope"), json=GOOD).status_code == 400
    assert http.put(job.job_update_url.replace(job.task_id, "other"), json=GOOD).status_code == 400
    assert post_status(http, job.pipeline_status_url.replace(job.task_id, "other"), "PipelineComplete").status_code == 400


def test_status_body_is_trimmed_and_case_insensitive(standin, http):
    job = standin.new_job()
    http.put(job.job_update_url, json=GOOD)
    assert post_status(http, job.pipeline_status_url, "pipelinecomplete\n").status_code == 200


def test_status_body_that_is_not_a_status_is_rejected(standin, http):
    job = standin.new_job()
    http.put(job.job_update_url, json=GOOD)
    assert post_status(http, job.pipeline_status_url, "Complete").status_code == 400


def test_missing_output_file_at_status_time_ends_the_job_in_error(standin, http, tmp_path):
    (tmp_path / "there.csv").write_text("x")
    job = standin.new_job()
    files = [{"DirName": str(tmp_path), "Name": n, "Extension": "csv"} for n in ("there.csv", "gone.csv")]
    http.put(job.job_update_url, json={**GOOD, "OutputFiles": files})
    assert post_status(http, job.pipeline_status_url, "PipelineComplete").status_code == 200
    state = standin.wait_for_status(job.job_id, timeout=1)
    assert state.ended == "error" and state.missing_files == [str(tmp_path / "gone.csv")]


def test_injected_faults_answer_first_then_the_rules_apply(standin, http):
    job = standin.new_job()
    standin.fail_next(job.job_id, kind="put", status_code=500, times=2)
    codes = [http.put(job.job_update_url, json=GOOD).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert [r.status_code for r in standin.requests_for(job.job_id)] == [500, 500, 200]


def test_wait_for_status_times_out_with_what_arrived(standin, http):
    job = standin.new_job()
    http.put(job.job_update_url, json=GOOD)
    with pytest.raises(TimeoutError, match=r"\('PUT', 200\)"):
        standin.wait_for_status(job.job_id, timeout=0.2)


def test_stand_in_refuses_to_bind_outside_loopback():
    with pytest.raises(ValueError, match="loopback"):
        AicsdStandIn(host="0.0.0.0")


def test_parser_reports_the_offending_field():
    with pytest.raises(ContractError, match="OutputFiles"):
        parse_job_update(b'{"OutputFiles": "x"}')


def test_sink_mode_registers_jobs_on_their_first_update_and_lists_when_they_ended(http):
    with AicsdStandIn(auto_register=True) as sink:
        url = f"{sink.base_url}/api/v1/job/pipeline/j1/t1"
        assert http.put(url, json=GOOD).status_code == 200
        assert post_status(http, f"{sink.base_url}/api/v1/pipelineStatus/j1/t1", "PipelineComplete").status_code == 200
        assert post_status(http, f"{sink.base_url}/api/v1/pipelineStatus/j2/t2", "PipelineComplete").status_code == 400
        ended = http.get(f"{sink.base_url}/_ended").json()
        assert list(ended) == ["j1"] and ended["j1"] > 0


def write_images(folder):
    import numpy as np
    import tifffile
    from PIL import Image

    pixels = np.zeros((8, 8, 3), np.uint8)
    tifffile.imwrite(folder / "a-counted.tiff", pixels, photometric="rgb")
    Image.fromarray(pixels).save(folder / "b.png")
    (folder / "c-counts.csv").write_text("page,x,y\n1,2,3\n")


def listed(folder, name, extension):
    return {"DirName": str(folder), "Name": name, "Extension": extension}


def test_file_sender_makes_a_viewable_jpeg_of_every_listed_image_named_by_its_extension(standin, http, tmp_path):
    write_images(tmp_path)
    job = standin.new_job()
    files = [listed(tmp_path, "a-counted.tiff", ".tiff"), listed(tmp_path, "b.png", ".png")]
    http.put(job.job_update_url, json={**GOOD, "OutputFiles": files})
    assert post_status(http, job.pipeline_status_url, "PipelineComplete").status_code == 200
    state = standin.wait_for_status(job.job_id, timeout=1)
    assert state.ended == "complete" and state.viewable == ["a-counted.jpeg", "b.jpeg"]


def test_file_sender_answers_500_at_a_listed_file_that_is_not_an_image(standin, http, tmp_path):
    write_images(tmp_path)
    job = standin.new_job()
    files = [listed(tmp_path, n, e) for n, e in
             (("a-counted.tiff", ".tiff"), ("c-counts.csv", ".csv"), ("b.png", ".png"))]
    http.put(job.job_update_url, json={**GOOD, "OutputFiles": files})
    answer = post_status(http, job.pipeline_status_url, "PipelineComplete")
    assert answer.status_code == 500 and "c-counts.csv" in answer.text
    state = standin.wait_for_status(job.job_id, timeout=1)
    # It stops at the first failure: the PNG after the CSV is never converted.
    assert state.ended == "error" and state.viewable == ["a-counted.jpeg"]
    assert "c-counts.csv" in state.file_sender_error


@pytest.mark.parametrize(
    "name, extension, viewable",
    [
        ("a-counted.tiff", ".tiff", "a-counted.jpeg"),
        ("a-counted.tiff", "tiff", "a-counted..jpeg"),
        ("tiffs-1.tiff", "tiff", ".jpegs-1.tiff"),
        ("x.tiff", "", ".jpegx.tiff"),
    ],
    ids=["dotted", "dotless", "name-holds-the-extension-earlier", "empty"],
)
def test_viewable_name_replaces_the_extension_once_as_go_does(name, extension, viewable):
    from devtools.aicsd_standin import viewable_name

    assert viewable_name(name, extension) == viewable


def test_a_task_look_up_keeps_the_connection_and_answers_head_and_body_in_one_write():
    """Two small writes would stall on Nagle against the client's delayed ACK (about 40 ms each):
    the task endpoint must answer like Go's net/http, on a connection it keeps open."""
    import socket

    with AicsdStandIn() as standin:
        job = standin.new_job("ovms/cell-counter")
        host, port = standin.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            for _ in range(2):  # the second request on the same connection proves it stayed open
                sock.sendall(f"GET /api/v1/task/{job.task_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                first = sock.recv(65536)
                assert first.startswith(b"HTTP/1.1 200") and b'"PipelineId": "ovms/cell-counter"' in first
                assert b"Connection: close" not in first
