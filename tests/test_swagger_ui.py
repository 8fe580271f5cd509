"""The Swagger UI in a real headless Chromium: the seed's request is the example, and it runs."""

from __future__ import annotations

import json
import shutil
import uuid
from urllib.parse import urlsplit

import pytest

from .conftest import ARTIFACTS, copy_into

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Nothing but the service on loopback is looked up: the page's badges stay unloaded.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture
def page(service):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    own = urlsplit(service.url).netloc
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1600})
            # Requests to any other host (badges, analytics in BentoML's page) never leave the browser.
            tab.route("**/*", lambda route: route.continue_() if urlsplit(route.request.url).netloc == own
                      else route.abort())
            yield tab
        finally:
            browser.close()


def test_classify_is_listed_with_the_seed_example_and_try_it_out_returns_200(
    page, service, aicsd, file_root, photos
):
    from aicsd.job import SEED_EXAMPLE

    page.goto(f"{service.url}/", wait_until="networkidle")
    operation = page.locator(".opblock-post", has_text="/classify").first
    operation.locator(".opblock-summary").click()
    example = operation.locator(".body-param__example, .microlight").first.inner_text()
    shown = json.loads(example)
    assert shown == SEED_EXAMPLE

    operation.get_by_role("button", name="Try it out").click()
    editor = operation.locator("textarea.body-param__text")
    assert json.loads(editor.input_value()) == SEED_EXAMPLE
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    job = aicsd.new_job()
    body = {**SEED_EXAMPLE, "InputFileLocation": str(image), "OutputFileFolder": str(file_root / "output"),
            "JobUpdateUrl": job.job_update_url, "PipelineStatusUrl": job.pipeline_status_url}
    editor.fill(json.dumps(body, indent=2))
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "swagger-classify.png"), full_page=True)
    assert status.inner_text().strip().startswith("200")
    assert aicsd.wait_for_status(job.job_id, timeout=30).stored_status == "PipelineComplete"
