"""Service settings: documented defaults, and one error that lists every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicsd.errors import SettingsError
from serving.settings import Settings


def test_defaults_match_the_design():
    s = Settings.from_env({})
    assert s.models_dir == (Path("models"),) and s.model_poll == 2.0
    assert s.default_model == "efficientnet-lite0"
    assert s.file_roots == (Path("/tmp/files"),)
    assert s.callback_hosts == {"job-repository", "task-launcher", "localhost", "127.0.0.1"}
    assert s.device == "CPU"
    assert s.max_pixels == 100_000_000
    assert (s.callback_tries, s.callback_backoff) == (5, 2.0)
    assert s.repeat_window == 7 * 86400
    assert s.task_lookup is True and s.shared_topic is False
    assert s.ledger.name == "ledger.sqlite3"


def test_lists_are_split_and_cleaned():
    s = Settings.from_env({"PIPELINE_FILE_ROOTS": "/a:/b/c", "PIPELINE_CALLBACK_HOSTS": " Job-Repo:59784 , x "})
    assert s.file_roots == (Path("/a"), Path("/b/c"))
    assert s.callback_hosts == {"job-repo:59784", "x"}


def test_empty_cache_dir_disables_the_cache():
    assert Settings.from_env({"PIPELINE_CACHE_DIR": ""}).cache_dir is None


def test_every_bad_setting_is_listed_in_one_error():
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "PIPELINE_FILE_ROOTS": "relative/path",
                "PIPELINE_MAX_PIXELS": "-5",
                "PIPELINE_CALLBACK_TRIES": "many",
                "PIPELINE_PERFORMANCE_HINT": "FAST",
                "PIPELINE_DEFAULT_MODEL": "../etc",
            }
        )
    names = [p.split("=")[0] for p in info.value.problems]
    assert names == [
        "PIPELINE_DEFAULT_MODEL",
        "PIPELINE_FILE_ROOTS",
        "PIPELINE_PERFORMANCE_HINT",
        "PIPELINE_MAX_PIXELS",
        "PIPELINE_CALLBACK_TRIES",
    ]
    assert "relative/path" in str(info.value)


@pytest.mark.parametrize("raw", ["a:xx", ":80", ""])
def test_bad_callback_host_entries_are_refused(raw):
    with pytest.raises(SettingsError, match="PIPELINE_CALLBACK_HOSTS"):
        Settings.from_env({"PIPELINE_CALLBACK_HOSTS": raw})


def test_ipv6_callback_hosts_are_accepted():
    assert Settings.from_env({"PIPELINE_CALLBACK_HOSTS": "[::1]:8080,::1"}).callback_hosts == {"[::1]:8080", "[::1]"}


def test_log_level_is_a_declared_setting():
    assert Settings.from_env({"PIPELINE_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(SettingsError, match="PIPELINE_LOG_LEVEL='loud'"):
        Settings.from_env({"PIPELINE_LOG_LEVEL": "loud"})


def test_a_problem_names_the_variable_its_value_and_what_it_is_for():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"PIPELINE_CALLBACK_TIMEOUT": "0"})
    (problem,) = info.value.problems
    assert problem.startswith("PIPELINE_CALLBACK_TIMEOUT='0': ")
    assert "greater than 0" in problem and "seconds per callback request" in problem
