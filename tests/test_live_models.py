"""Models that arrive, change and leave while the real service runs, as in AiCSD's `models/`.

The service watches two folders (its own and a stand-in for AiCSD's) every 0.25 s. Every wait
here is on what the service reports: the look number it sends with GET /api/v1/pipelines
(`X-Model-Poll`), its listing, its job answers. None is on the clock, beyond bounds that fail a
hang.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from devtools.servers import Service, serve_bento, stop_process

from .conftest import ARTIFACTS, REPO, copy_into

pytestmark = pytest.mark.integration

POLL = 0.25


def ballast_classifier(labels: str, folder: Path) -> Path:
    """A 3-class channel-mean classifier whose .bin weighs 80 KB, so it can arrive in pieces."""
    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    logits = ops.reduce_mean(image, np.array([2, 3], np.int64), keep_dims=False)
    ballast = ops.reduce_sum(ops.constant(np.ones(20_000, np.float32)), np.array([0], np.int64), keep_dims=False)
    out = ops.add(logits, ops.multiply(ballast, np.float32(0)))
    out.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([out], [image], "ballast")
    model.set_rt_info("Classification", ["model_info", "model_type"])
    model.set_rt_info("Classification", ["model_info", "aicsd_pipeline"])  # our classifier: RGB in
    model.set_rt_info(labels, ["model_info", "labels"])
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)
    return folder


class Watched:
    """The running service and what it says about its models."""

    def __init__(self, service: Service, http: httpx.Client) -> None:
        self.service = service
        self.http = http

    def listing(self) -> tuple[int, dict[str, dict]]:
        response = self.http.get(f"{self.service.url}/api/v1/pipelines")
        assert response.status_code == 200, response.text
        return int(response.headers["X-Model-Poll"]), {p["id"].removeprefix("ovms/"): p for p in response.json()}

    def poll(self) -> int:
        return self.listing()[0]

    def wait_polls(self, count: int) -> int:
        """Wait until the service has looked at its folders `count` more times."""
        target = self.poll() + count
        deadline = time.monotonic() + 60
        while (now := self.poll()) < target:
            assert time.monotonic() < deadline, f"the service stopped looking at its models:\n{self.service.log_text()[-2000:]}"
            time.sleep(POLL / 5)
        return now

    def wait_listed(self, name: str, description: str | None) -> int:
        """Wait until the listing shows `name` with `description` (None: not listed); its look number."""
        deadline = time.monotonic() + 60
        while True:
            poll, listed = self.listing()
            shown = listed.get(name, {}).get("description")
            if shown is not None:
                shown = shown.split("; parameters: ")[0]  # what is served, without its parameters
            if shown == description:
                return poll
            assert time.monotonic() < deadline, f"{name}: listed as {shown!r}, waited for {description!r}"
            time.sleep(POLL / 5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    own = tmp_path_factory.mktemp("own-models")
    shared = tmp_path_factory.mktemp("aicsd-models")
    ballast_classifier("own1 own2 own3", own / "base" / "1")
    ballast_classifier("v1red v1green v1blue", shared / "counted" / "1")
    return own, shared


@pytest.fixture(scope="module")
def watched(folders, file_root, tmp_path_factory) -> Iterator[Watched]:
    own, shared = folders
    ARTIFACTS.mkdir(exist_ok=True)
    env = {
        "PIPELINE_MODELS_DIR": f"{own}:{shared}",
        "PIPELINE_DEFAULT_MODEL": "base",
        "PIPELINE_MODEL_POLL": str(POLL),
        "PIPELINE_FILE_ROOTS": str(file_root),
        "PIPELINE_CALLBACK_HOSTS": "127.0.0.1",
        "PIPELINE_CACHE_DIR": "",
        "PIPELINE_TASK_LOOKUP": "false",  # the jobs' ModelParams name the model
        "PIPELINE_LEDGER": str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"),
    }
    service = serve_bento("service:AicsdPipeline", env=env, cwd=REPO, log_path=ARTIFACTS / "live-models.log")
    try:
        with httpx.Client(timeout=60, trust_env=False) as http:
            yield Watched(service, http)
    finally:
        stop_process(service.process)


class JobFlow:
    """Jobs for one model posted back to back on a thread, each answer kept."""

    def __init__(self, watched: Watched, aicsd, image: Path, output: Path, model: str) -> None:
        self.watched, self.aicsd, self.image, self.output, self.model = watched, aicsd, image, output, model
        self.answers: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        with httpx.Client(timeout=60, trust_env=False) as http:
            while not self._stop.is_set():
                self.answers.append(post_job(http, self.watched, self.aicsd, self.image, self.output, self.model))

    def labels_seen(self) -> list[str]:
        return [json.loads(a["Results"])["top"][0]["label"] for a in self.answers if a["Status"] == "PipelineComplete"]


def post_job(http: httpx.Client, watched: Watched, aicsd, image: Path, output: Path, model: str) -> dict:
    job = aicsd.new_job()
    body = {
        "InputFileLocation": str(image),
        "OutputFileFolder": str(output),
        "ModelParams": {"Model": model, "TopK": "3"},
        "JobUpdateUrl": job.job_update_url,
        "PipelineStatusUrl": job.pipeline_status_url,
        "GatewayIP": "127.0.0.1",
    }
    response = http.post(f"{watched.service.url}/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def copy_in_pieces(
    watched: Watched, copies: list[tuple[Path, Path]], chunks: int = 4, before_last: Callable[[], None] = lambda: None
) -> None:
    """Copy version folders side by side as a slow copier would: the .xml, then the .bin in chunks.

    After each piece the service looks twice, so each half-copied state has sat still for two
    looks, exactly what a stalled copy looks like; the last pieces land together.
    """
    for source, target in copies:
        target.mkdir(parents=True)
        shutil.copyfile(source / "model.xml", target / "model.xml")
    datas = [(source / "model.bin").read_bytes() for source, _ in copies]
    for piece in range(chunks):
        watched.wait_polls(2)
        if piece == chunks - 1:
            before_last()
        _, listed = watched.listing()
        for (_, target), data in zip(copies, datas, strict=False):
            name = target.parent.name
            described = listed.get(name, {}).get("description") or ""
            assert not described.startswith(f"{name} version {target.name};"), "half-copied"
            assert described != f"{name} version {target.name}", "half-copied"
            step = len(data) // chunks + 1
            with (target / "model.bin").open("ab") as out:
                out.write(data[piece * step:(piece + 1) * step])


def test_models_copied_into_a_watched_folder_in_pieces_are_served_once_complete_while_jobs_flow(
    watched, folders, aicsd, file_root, photos, tmp_path
):
    _, shared = folders
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    output = file_root / "output"
    staged_v2 = ballast_classifier("v2red v2green v2blue", tmp_path / "counted-2")
    staged_new = ballast_classifier("newred newgreen newblue", tmp_path / "fresh-1")
    watched.wait_listed("counted", "counted version 1")

    answered_before_complete = 0
    with JobFlow(watched, aicsd, image, output, "counted") as flow:

        def count_answers() -> None:
            nonlocal answered_before_complete
            answered_before_complete = len(flow.answers)

        copy_in_pieces(watched, [(staged_v2, shared / "counted" / "2"), (staged_new, shared / "fresh" / "1")],
                       before_last=count_answers)
        done = watched.poll()
        served_v2 = watched.wait_listed("counted", "counted version 2")
        served_new = watched.wait_listed("fresh", "fresh version 1")
        # Polls done+2 and done+3 both began after the copy ended: the second of them loads it.
        assert served_v2 <= done + 3 and served_new <= done + 3
        before = len(flow.answers)
        deadline = time.monotonic() + 60
        while "v2red" not in flow.labels_seen()[before:]:
            assert time.monotonic() < deadline, "jobs never reached version 2"
            time.sleep(0.05)

    failed = [a for a in flow.answers if a["Status"] != "PipelineComplete"]
    assert failed == [], failed[:3]
    labels = flow.labels_seen()
    switch = labels.index("v2red")
    # Every job answered before the copy was complete ran on version 1, then each on version 2.
    assert answered_before_complete > 0 and switch >= answered_before_complete
    assert set(labels[:switch]) == {"v1red"} and set(labels[switch:]) == {"v2red"}
    with httpx.Client(timeout=60, trust_env=False) as http:
        fresh = post_job(http, watched, aicsd, image, output, "fresh")
    assert fresh["Status"] == "PipelineComplete" and json.loads(fresh["Results"])["top"][0]["label"] == "newred"
    log = watched.service.log_text()
    assert "model counted version 2 loaded" in log and "replaces version 1" in log


def test_a_removed_model_is_no_longer_listed_nor_served(watched, folders, aicsd, file_root, photos, tmp_path):
    _, shared = folders
    ballast_classifier("gone1 gone2 gone3", shared / "leaving" / "1")
    watched.wait_listed("leaving", "leaving version 1")
    shutil.rmtree(shared / "leaving")
    removed_at = watched.poll()
    # Look removed_at+2 began after the removal: it no longer finds the model.
    assert watched.wait_listed("leaving", None) <= removed_at + 2
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    with httpx.Client(timeout=60, trust_env=False) as http:
        answer = post_job(http, watched, aicsd, image, file_root / "output", "leaving")
    assert answer["Status"] == "PipelineFailed" and "unknown model 'leaving'" in answer["Results"]


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(watched, folders, aicsd, file_root, photos):
    _, shared = folders
    ballast_classifier("keep1 keep2 keep3", shared / "steady" / "1")
    watched.wait_listed("steady", "steady version 1")
    broken = shared / "steady" / "2"
    broken.mkdir()
    (broken / "model.xml").write_text("<net name='broken'>not an IR</net>")
    (broken / "model.bin").write_bytes(b"\0" * 16)
    watched.wait_polls(3)
    _, listed = watched.listing()
    assert listed["steady"]["description"].startswith("steady version 1 (version 2 ")
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    with httpx.Client(timeout=60, trust_env=False) as http:
        answer = post_job(http, watched, aicsd, image, file_root / "output", "steady")
    assert answer["Status"] == "PipelineComplete" and json.loads(answer["Results"])["top"][0]["label"] == "keep1"
    assert "model steady version 2 does not read yet" in watched.service.log_text()


def test_a_name_in_both_folders_is_served_from_the_first(watched, folders, aicsd, file_root, photos):
    own, shared = folders
    ballast_classifier("second1 second2 second3", shared / "base" / "1")
    watched.wait_polls(3)
    _, listed = watched.listing()
    assert listed["base"]["description"].split("; parameters: ")[0] == "base version 1"
    image = copy_into(file_root, photos["chelsea"], f"{uuid.uuid4()}.png")
    with httpx.Client(timeout=60, trust_env=False) as http:
        answer = post_job(http, watched, aicsd, image, file_root / "output", "base")
    assert json.loads(answer["Results"])["top"][0]["label"] == "own1"
    assert watched.service.log_text().count(f"model base is in {own / 'base'} and in {shared / 'base'}") == 1


@pytest.fixture(scope="module")
def without_default(tmp_path_factory, file_root) -> Iterator[tuple[Watched, Path]]:
    """A service whose default model is not there, started with BENTOML_CONFIG naming a copy of
    bentoml.yaml that turns Prometheus metrics off."""
    models = tmp_path_factory.mktemp("no-default-models")
    ballast_classifier("a b c", models / "other" / "1")
    config = tmp_path_factory.mktemp("config") / "bentoml-no-metrics.yaml"
    text = (REPO / "bentoml.yaml").read_text()
    config.write_text(text.replace("metrics:\n      enabled: true", "metrics:\n      enabled: false"))
    assert config.read_text() != text
    env = {
        "BENTOML_CONFIG": str(config),
        "PIPELINE_MODELS_DIR": str(models),
        "PIPELINE_DEFAULT_MODEL": "base",
        "PIPELINE_MODEL_POLL": str(POLL),
        "PIPELINE_FILE_ROOTS": str(file_root),
        "PIPELINE_CACHE_DIR": "",
        "PIPELINE_TASK_LOOKUP": "false",  # with it off, jobs that name no model run on the default one
        "PIPELINE_LEDGER": str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    service = serve_bento("service:AicsdPipeline", env=env, cwd=REPO, log_path=ARTIFACTS / "no-default.log",
                          wait_for="/livez")
    try:
        with httpx.Client(timeout=60, trust_env=False) as http:
            yield Watched(service, http), models
    finally:
        stop_process(service.process)


def test_a_service_without_its_default_model_is_not_ready_until_the_model_arrives(without_default):
    watched, models = without_default
    watched.wait_polls(2)
    readyz = watched.http.get(f"{watched.service.url}/readyz")
    assert readyz.status_code == 503
    assert "default model base (PIPELINE_DEFAULT_MODEL) is not loaded" in watched.service.log_text()
    ballast_classifier("d e f", models / "base" / "1")
    arrived = watched.poll()
    # Looks arrived+2 and arrived+3 both began after the model was written: the second loads it.
    assert watched.wait_listed("base", "base version 1") <= arrived + 3
    assert watched.http.get(f"{watched.service.url}/readyz").status_code == 200


def test_bentoml_config_names_the_runtime_configuration(without_default):
    watched, _ = without_default
    # bentoml.yaml turns metrics on; the copy BENTOML_CONFIG names turns them off.
    assert watched.http.get(f"{watched.service.url}/metrics").status_code == 404
    assert watched.http.get(f"{watched.service.url}/livez").status_code == 200
