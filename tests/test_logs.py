"""Log lines a job cannot forge: job text escaped and cut, a refused request in one line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from aicsd.job import SEED_EXAMPLE, JobRequest
from aicsd.logs import FORMAT, JobLog, quiet_refused_requests, shown


@pytest.mark.parametrize("text, expected", [
    ("/tmp/files/input/1.tiff", "/tmp/files/input/1.tiff"),
    ("a\nb", "a\\nb"),
    ("a\r\nINFO forged", "a\\r\\nINFO forged"),
    ("\x1b[31mred\x00", "\\x1b[31mred\\x00"),
    ("line\u2028separator\x85", "line\\u2028separator\\x85"),
    ("C:\\n", "C:\\\\n"),  # a real backslash stays distinguishable from an escaped newline
    ("caf\u00e9 \u2713", "caf\u00e9 \u2713"),
])
def test_shown_escapes_what_could_break_or_fake_a_line_and_keeps_the_rest(text, expected):
    assert shown(text) == expected


def test_shown_cuts_long_text_and_says_how_long_it_was():
    out = shown("x" * 10_000_000)
    assert out == "x" * 200 + "... (10000000 characters)"
    assert shown("\n" * 150).endswith("... (150 characters)") and len(shown("\n" * 150)) < 230
    assert shown("y" * 200) == "y" * 200


def test_shown_takes_any_object():
    assert shown(ValueError("bad\nthing")) == "bad\\nthing"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    logger = logging.getLogger("tests.logs.captured")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_job_log_names_the_job_and_task_with_their_ids_shown(captured):
    logger, stream = captured
    JobLog(logger, "j1\nINFO forged", "t" * 1000).info("done")
    (line,) = stream.getvalue().splitlines()
    assert "job=j1\\nINFO forged task=" + "t" * 200 + "... (1000 characters) done" in line


def test_a_validation_error_logged_by_bentoml_becomes_one_warning_line(captured):
    logger, stream = captured
    logger.addFilter(_filter_of(quiet_refused_requests))
    try:
        JobRequest.model_validate({**SEED_EXAMPLE, "JobUpdateUrl": "http://h/x\u2028", "InputFileLocation": 7})
    except ValidationError:
        logger.error("Exception on %s [%s]", "/classify", "POST", exc_info=True)  # as BentoML's log_exception does
    (line,) = stream.getvalue().splitlines()
    assert "[WARNING]" in line and "refused request to /classify (HTTP 400)" in line
    assert "InputFileLocation: Input should be a valid string" in line and "JobUpdateUrl: " in line
    assert "Traceback" not in stream.getvalue()


def test_a_4xx_error_of_the_framework_becomes_one_warning_line(captured):
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    logger, stream = captured
    logger.addFilter(_filter_of(quiet_refused_requests))
    try:
        raise BentoMLException("pickle is not allowed\nhere", error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    except BentoMLException:
        logger.error("Exception on %s [%s]", "/classify", "POST", exc_info=True)
    (line,) = stream.getvalue().splitlines()
    assert "[WARNING]" in line and "refused request to /classify (HTTP 415): pickle is not allowed\\nhere" in line


def test_other_errors_keep_their_traceback(captured):
    logger, stream = captured
    logger.addFilter(_filter_of(quiet_refused_requests))
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    for error in (RuntimeError("boom"), BentoMLException("broken", error_code=HTTPStatus.INTERNAL_SERVER_ERROR)):
        try:
            raise error
        except Exception:
            logger.error("Exception on %s [%s]", "/classify", "POST", exc_info=True)
    assert stream.getvalue().count("[ERROR]") == 2 and stream.getvalue().count("Traceback") == 2


def _filter_of(install) -> logging.Filter:  # type: ignore[no-untyped-def]
    """The filter `install` puts on BentoML's logger, to try it on a logger of our own."""
    install()
    install()  # idempotent: one filter however often the service starts
    from aicsd.logs import REFUSING_LOGGERS

    (flt,) = logging.getLogger(REFUSING_LOGGERS[0]).filters
    return flt
