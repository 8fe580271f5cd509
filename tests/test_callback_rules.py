"""Callback URLs exactly as AiCSD publishes them, the allow list of hosts, and the task URL."""

from __future__ import annotations

import pytest

from aicsd.callback_rules import host_allowed, parse_callback_hosts, parse_callback_url, task_url
from aicsd.job import SEED_EXAMPLE
from serving.settings import Settings

JOB_ID = "7c9fdbde-3b56-48af-a405-51d718cd9711"
TASK_ID = "15c40f2d-68d2-4f09-9133-23f101b8b660"
UPDATE = SEED_EXAMPLE["JobUpdateUrl"]
STATUS = SEED_EXAMPLE["PipelineStatusUrl"]


def test_the_seed_urls_parse_into_host_port_and_ids():
    update = parse_callback_url(UPDATE, "JobUpdateUrl")
    status = parse_callback_url(STATUS, "PipelineStatusUrl")
    assert (update.scheme, update.host, update.port) == ("http", "job-repository", 59784)
    assert (status.host, status.port) == ("task-launcher", 59785)
    assert (update.job_id, update.task_id) == (status.job_id, status.task_id) == (JOB_ID, TASK_ID)


@pytest.mark.parametrize("url, host, port", [
    ("http://[::1]/api/v1/job/pipeline/j/t", "[::1]", 80),
    ("https://[::1]:8443/api/v1/job/pipeline/j/t", "[::1]", 8443),
    ("http://[0:0:0:0:0:0:0:1]:5/api/v1/job/pipeline/j/t", "[::1]", 5),
    ("HTTP://Job-Repository:59784/api/v1/job/pipeline/J_1/t-2", "job-repository", 59784),
    ("http://edgex_job_repository:1/api/v1/job/pipeline/j/t", "edgex_job_repository", 1),
    (f"http://127.0.0.1:65535/api/v1/job/pipeline/{'a' * 128}/t", "127.0.0.1", 65535),
])
def test_hosts_ports_and_ids_aicsd_may_use_are_accepted(url, host, port):
    parsed = parse_callback_url(url, "JobUpdateUrl")
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize("field, prefix", [("JobUpdateUrl", "/api/v1/job/pipeline"),
                                           ("PipelineStatusUrl", "/api/v1/pipelineStatus")])
@pytest.mark.parametrize("port", [1, 59784, 65535])
def test_the_attack_from_issue_8_is_refused_naming_the_field(field, prefix, port):
    url = f"http://127.0.0.1:{port}/admin/delete-everything{prefix}/{JOB_ID}/t?cmd=drop"
    with pytest.raises(ValueError, match=f"^{field} "):
        parse_callback_url(url, field)


@pytest.mark.parametrize("url, problem", [
    ("http://h/admin/api/v1/job/pipeline/j/t", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j/t/more", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j/t/", "exactly the path"),  # AiCSD never adds a trailing slash
    ("http://h//api/v1/job/pipeline/j/t", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j.1/t", "exactly the path"),
    ("http://h/api/v1/job/pipeline/../t", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j%2F1/t", "exactly the path"),
    (f"http://h/api/v1/job/pipeline/{'a' * 129}/t", "exactly the path"),
    ("http://h/api/v1/pipelineStatus/j/t", "exactly the path"),
    ("http://h/api/v1/job/pipeline/j/t?", "no query"),
    ("http://h/api/v1/job/pipeline/j/t?cmd=drop", "no query"),
    ("http://h/api/v1/job/pipeline/j/t#top", "no fragment"),
    ("http://user:pw@h/api/v1/job/pipeline/j/t", "user info"),
    ("http://@h/api/v1/job/pipeline/j/t", "user info"),
    ("http://h:0/api/v1/job/pipeline/j/t", "invalid port '0'"),
    ("http://h:65536/api/v1/job/pipeline/j/t", "invalid port"),
    ("http://h:/api/v1/job/pipeline/j/t", "invalid port ''"),
    ("http://h:+80/api/v1/job/pipeline/j/t", "invalid port"),
    ("http:///api/v1/job/pipeline/j/t", "no host"),
    ("http://::1/api/v1/job/pipeline/j/t", "brackets"),
    ("http://[::g]/api/v1/job/pipeline/j/t", "not a valid URL"),
    ("http://[fe80::1%25eth0]/api/v1/job/pipeline/j/t", "invalid IPv6"),
    ("http://h\\@evil/api/v1/job/pipeline/j/t", "user info"),
    ("http://a\\b/api/v1/job/pipeline/j/t", "invalid host name"),
    ("http://localhost./api/v1/job/pipeline/j/t", "invalid host name"),
    ("http://-h/api/v1/job/pipeline/j/t", "invalid host name"),
    ("ftp://h/api/v1/job/pipeline/j/t", "http or https"),
    ("h:59784/api/v1/job/pipeline/j/t", "http or https"),
    # urlsplit drops tabs and line breaks: they must be refused before it sees the URL.
    ("http://h/api/v1/job/pipeline/j\n/t", "control characters"),
    ("http://h/api/v1/job/pipeline/j\t/t", "control characters"),
    ("http://h/api/v1/job/pipeline/j /t", "spaces"),
    ("", "empty"),
    ("http://h/api/v1/job/pipeline/j\u00e9/t", "not ASCII ('\u00e9' at position 30)"),
    ("http://h/api/v1/job/pipeline/j\u20ac/t", "not ASCII"),
    ("http://h\u0101/api/v1/job/pipeline/j/t", "not ASCII"),
])
def test_a_url_aicsd_would_not_send_is_refused_with_the_reason(url, problem):
    with pytest.raises(ValueError) as info:
        parse_callback_url(url, "JobUpdateUrl")
    assert str(info.value).startswith("JobUpdateUrl ") and problem in str(info.value)


def test_a_refusal_quotes_at_most_a_cut_of_a_huge_url():
    with pytest.raises(ValueError) as info:
        parse_callback_url("http://h/" + "x" * 1_000_000, "JobUpdateUrl")
    assert len(str(info.value)) < 500 and "1000001 characters" in str(info.value)


def test_task_url_is_the_task_launchers_task_on_the_status_urls_origin():
    assert task_url(STATUS) == f"http://task-launcher:59785/api/v1/task/{TASK_ID}"
    assert task_url("https://[::1]:8443/api/v1/pipelineStatus/j/t-1") == "https://[::1]:8443/api/v1/task/t-1"
    assert task_url("http://127.0.0.1/api/v1/pipelineStatus/j/t") == "http://127.0.0.1/api/v1/task/t"


def test_task_url_refuses_what_is_not_a_status_url():
    with pytest.raises(ValueError, match="PipelineStatusUrl"):
        task_url(UPDATE)


@pytest.mark.parametrize("raw, expected", [
    ("job-repository, Task-Launcher:59785", {"job-repository", "task-launcher:59785"}),
    ("[::1]", {"[::1]"}),
    ("[::1]:8080", {"[::1]:8080"}),
    ("[0:0:0:0:0:0:0:1]:08080,*", {"[::1]:8080", "*"}),
    ("::1,fe80::1", {"[::1]", "[fe80::1]"}),  # a whole IPv6 address without brackets: no port
    ("127.0.0.1,localhost", {"127.0.0.1", "localhost"}),
])
def test_allow_list_entries_parse_in_the_spelling_urls_are_compared_in(raw, expected):
    assert parse_callback_hosts(raw) == expected


@pytest.mark.parametrize("raw, problem", [
    ("", "no host"),
    (" , ", "no host"),
    ("::1:80:", "brackets"),
    ("[::1", "brackets"),
    ("[::1]:0", "invalid port"),
    ("h:0", "invalid port"),
    ("h:", "invalid port"),
    ("h:http", "invalid port"),
    (":80", "no host"),
    ("h/x", "invalid host name"),
])
def test_a_bad_allow_list_entry_is_refused_naming_it(raw, problem):
    with pytest.raises(ValueError, match=problem):
        parse_callback_hosts(raw)


def test_an_ipv6_entry_in_brackets_no_longer_stops_start_up():
    settings = Settings.from_env({"PIPELINE_CALLBACK_HOSTS": "[::1],[::1]:8080,job-repository"})
    assert settings.callback_hosts == {"[::1]", "[::1]:8080", "job-repository"}


@pytest.mark.parametrize("allowed, url, ok", [
    ("job-repository", "http://job-repository:1/api/v1/job/pipeline/j/t", True),  # a bare host: any port
    ("job-repository:59784", "http://job-repository:59784/api/v1/job/pipeline/j/t", True),
    ("job-repository:59784", "http://job-repository:8080/api/v1/job/pipeline/j/t", False),
    ("job-repository:80", "http://job-repository/api/v1/job/pipeline/j/t", True),  # the scheme's port
    ("job-repository:80", "https://job-repository/api/v1/job/pipeline/j/t", False),
    ("JOB-repository", "http://job-REPOSITORY/api/v1/job/pipeline/j/t", True),
    ("[::1]", "http://[::1]:5/api/v1/job/pipeline/j/t", True),
    ("[::1]:8080", "http://[0::1]:8080/api/v1/job/pipeline/j/t", True),
    ("[::1]:8080", "http://[::1]:8081/api/v1/job/pipeline/j/t", False),
    ("127.0.0.1", "http://127.0.0.2/api/v1/job/pipeline/j/t", False),
    ("127.0.0.1", "http://127.1/api/v1/job/pipeline/j/t", False),  # other spellings fail closed
    ("*", "http://anything.example:9/api/v1/job/pipeline/j/t", True),
])
def test_a_url_is_allowed_only_by_its_host_or_its_host_and_port(allowed, url, ok):
    assert host_allowed(parse_callback_url(url, "JobUpdateUrl"), parse_callback_hosts(allowed)) is ok
