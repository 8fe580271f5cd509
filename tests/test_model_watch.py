"""The model watcher, one look at a time: when a version is loaded, kept, replaced or dropped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from aicsd.errors import ModelError
from pipeline.model_repository import ModelRepository
from serving.model_watch import ModelWatcher
from serving.runner import PipelineRunner
from serving.settings import Settings

from .tiny_models import channel_mean_classifier, write_model


def classifier(version_dir: Path, labels: str, model_type: str = "Classification") -> Path:
    """Our own classifier kind (`aicsd_pipeline`), so these tests see the watcher, not the kinds."""
    return write_model(version_dir, channel_mean_classifier(8),
                       {"model_type": model_type, "labels": labels, "aicsd_pipeline": model_type})


def watcher_for(*folders: Path) -> ModelWatcher:
    repository = ModelRepository(folders, cache_dir=None)
    runner = PipelineRunner(Settings.from_env({}), repository)
    runner.watched = True  # as once the watcher's thread runs: nothing compiles on a request
    watcher = ModelWatcher(repository, runner, interval=1)
    watcher.load_present()
    return watcher


def served_labels(watcher: ModelWatcher, name: str) -> tuple[str, ...]:
    return watcher.runner.pipeline(name).model.info.labels  # type: ignore[attr-defined]


def descriptions(watcher: ModelWatcher) -> dict[str, str]:
    return {m.name: m.description.split("; parameters: ")[0] for m in watcher.view.models}


def test_a_new_version_is_served_on_the_second_look_that_finds_it_unchanged(tmp_path):
    classifier(tmp_path / "m" / "1", "a1 b1 c1")
    watcher = watcher_for(tmp_path)
    classifier(tmp_path / "m" / "2", "a2 b2 c2")
    assert watcher.poll().poll == 1 and served_labels(watcher, "m")[0] == "a1"
    assert descriptions(watcher)["m"] == "m version 1 (version 2 loading)"
    watcher.poll()
    assert served_labels(watcher, "m")[0] == "a2" and descriptions(watcher)["m"] == "m version 2"


def test_a_half_copied_bin_that_sits_still_is_not_loaded_and_is_once_complete(tmp_path):
    classifier(tmp_path / "models" / "m" / "1", "a1 b1 c1")
    staged = classifier(tmp_path / "staged" / "2", "a2 b2 c2").parent
    watcher = watcher_for(tmp_path / "models")
    version = tmp_path / "models" / "m" / "2"
    version.mkdir()
    shutil.copyfile(staged / "model.xml", version / "model.xml")
    data = (staged / "model.bin").read_bytes()
    (version / "model.bin").write_bytes(data[: len(data) // 2])
    for _ in range(3):
        watcher.poll()
    assert served_labels(watcher, "m")[0] == "a1"
    assert descriptions(watcher)["m"] == "m version 1 (version 2 loading)"
    (version / "model.bin").write_bytes(data)
    watcher.poll()
    watcher.poll()
    assert served_labels(watcher, "m")[0] == "a2"


def test_a_job_keeps_the_pipeline_it_got_when_a_new_version_is_swapped_in(tmp_path):
    classifier(tmp_path / "m" / "1", "a1 b1 c1")
    watcher = watcher_for(tmp_path)
    running = watcher.runner.pipeline("m")
    classifier(tmp_path / "m" / "2", "a2 b2 c2")
    watcher.poll()
    watcher.poll()
    assert watcher.runner.pipeline("m") is not running
    out = running.model.infer(np.full((1, 8, 8, 3), 9, np.uint8))  # type: ignore[attr-defined]
    assert running.model.info.labels[0] == "a1" and np.allclose(next(iter(out.values())), 9)  # type: ignore[attr-defined]


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving_with_one_log_line(tmp_path, caplog):
    classifier(tmp_path / "m" / "1", "a1 b1 c1")
    watcher = watcher_for(tmp_path)
    classifier(tmp_path / "m" / "2", "x y z", model_type="NoSuchKind")
    with caplog.at_level(logging.ERROR, logger="serving.model_watch"):
        for _ in range(4):
            watcher.poll()
    assert served_labels(watcher, "m")[0] == "a1"
    assert descriptions(watcher)["m"].startswith("m version 1 (version 2 cannot be loaded: model 'm' has model_type")
    assert len([r for r in caplog.records if "cannot be loaded" in r.getMessage()]) == 1


def test_a_removed_model_is_withdrawn_and_unlisted(tmp_path):
    classifier(tmp_path / "m" / "1", "a1 b1 c1")
    classifier(tmp_path / "keep" / "1", "k1 k2 k3")
    watcher = watcher_for(tmp_path)
    shutil.rmtree(tmp_path / "m")
    watcher.poll()
    assert set(descriptions(watcher)) == {"keep"}
    with pytest.raises(ModelError, match=r"unknown model 'm' \(available: keep\)"):
        watcher.runner.pipeline("m")


def test_a_model_that_appears_is_not_compiled_on_a_request_before_the_watcher_loads_it(tmp_path):
    classifier(tmp_path / "keep" / "1", "k1 k2 k3")
    watcher = watcher_for(tmp_path)
    classifier(tmp_path / "new" / "1", "n1 n2 n3")
    with pytest.raises(ModelError, match="'new' version 1 is not loaded yet"):
        watcher.runner.pipeline("new")
    watcher.poll()
    watcher.poll()
    assert served_labels(watcher, "new")[0] == "n1"
