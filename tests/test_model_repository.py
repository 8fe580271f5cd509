"""The model repository: OVMS layout, model_info, folded preprocessing, one compile per model."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from aicsd.errors import ModelError
from pipeline.model_repository import ACTIVE_JOBS, ModelInfo, ModelRepository

from .tiny_models import channel_mean_classifier, identity_image, write_model


def repo(path) -> ModelRepository:
    return ModelRepository(path, device="CPU", performance_hint="THROUGHPUT", cache_dir=None)


def test_highest_version_holding_a_model_is_served(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier())
    write_model(tmp_path / "m" / "3", channel_mean_classifier())
    (tmp_path / "m" / "7").mkdir()
    (tmp_path / "m" / "latest").mkdir()
    [entry] = repo(tmp_path).discover()
    assert (entry.name, entry.version, entry.model_file.name) == ("m", 3, "model.xml")


def test_directory_with_only_an_empty_version_is_a_pipeline_with_no_model(tmp_path):
    (tmp_path / "nomodel" / "1").mkdir(parents=True)
    (tmp_path / "notamodel").mkdir()
    repository = repo(tmp_path)
    [entry] = repository.discover()
    assert entry.name == "nomodel" and not entry.has_model and entry.version == 1
    with pytest.raises(ModelError, match="no model file"):
        repository.get("nomodel")


def test_xml_without_its_bin_is_not_a_model(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier())
    (tmp_path / "m" / "1" / "model.bin").unlink()
    assert not repo(tmp_path).discover()[0].has_model


def test_unknown_model_error_lists_the_available_ones(tmp_path):
    write_model(tmp_path / "alpha" / "1", channel_mean_classifier())
    with pytest.raises(ModelError, match=r"unknown model 'beta' \(available: alpha\)"):
        repo(tmp_path).get("beta")


@pytest.mark.parametrize("name", ["../alpha", "", "alpha/1"])
def test_model_names_cannot_escape_the_repository(tmp_path, name):
    write_model(tmp_path / "alpha" / "1", channel_mean_classifier())
    with pytest.raises(ModelError, match="unknown model"):
        repo(tmp_path).entry(name)


def test_each_model_is_compiled_once(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier())
    repository = repo(tmp_path)
    assert repository.get("m") is repository.get("m")


def test_model_info_is_read_from_rt_info(tmp_path):
    write_model(
        tmp_path / "m" / "1",
        channel_mean_classifier(),
        {
            "model_type": "Classification",
            "labels": "red green blue",
            "mean_values": "1 2 3",
            "scale_values": "2 2 2",
            "resize_type": "crop",
            "crop_fraction": "0.875",
        },
    )
    info = repo(tmp_path).get("m").info
    assert info.model_type == "Classification"
    assert info.labels == ("red", "green", "blue")
    assert (info.mean_values, info.scale_values) == ((1, 2, 3), (2, 2, 2))
    assert (info.resize_type, info.crop_fraction) == ("crop", 0.875)


def test_label_names_json_keeps_labels_with_spaces(tmp_path):
    names = ["tabby, tabby cat", "tiger cat", "Persian cat"]
    write_model(tmp_path / "m" / "1", channel_mean_classifier(), {"label_names": json.dumps(names)})
    assert repo(tmp_path).get("m").info.labels == tuple(names)


def test_sidecar_gives_defaults_and_rt_info_overrides_them(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(), {"labels": "a b c"})
    (tmp_path / "m" / "model_info.json").write_text(
        json.dumps({"labels": "x y z", "model_type": "Classification", "mean_values": [10, 10, 10]})
    )
    info = repo(tmp_path).get("m").info
    assert info.labels == ("a", "b", "c")
    assert info.model_type == "Classification" and info.mean_values == (10, 10, 10)


@pytest.mark.parametrize(
    "entries, problem",
    [
        ({"mean_values": "1 two 3"}, "malformed"),
        ({"crop_fraction": "1.5"}, "crop_fraction"),
        ({"resize_type": "letterbox"}, "resize_type"),
        ({"reverse_input_channels": "maybe"}, "malformed"),
    ],
)
def test_malformed_model_info_is_a_model_error(entries, problem):
    with pytest.raises(ModelError, match=problem):
        ModelInfo.from_entries(entries, "model 'm'")


def test_corrupt_model_file_is_a_model_error(tmp_path):
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.xml").write_text("<net>not really</net>")
    (version / "model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="cannot be read"):
        repo(tmp_path).get("m")


def test_preprocessing_is_folded_into_the_model_u8_nhwc_rgb_in(tmp_path):
    write_model(
        tmp_path / "m" / "1",
        identity_image(2),
        {"mean_values": "10 20 30", "scale_values": "2 4 5"},
    )
    model = repo(tmp_path).get("m")
    assert model.image_size == (2, 2)
    image = np.zeros((1, 2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 110, 60, 80
    out = next(iter(model.infer(image).values()))
    assert out.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(out[0, :, 0, 0], [(110 - 10) / 2, (60 - 20) / 4, (80 - 30) / 5])


def test_reverse_input_channels_feeds_bgr_to_the_network(tmp_path):
    write_model(tmp_path / "m" / "1", identity_image(2), {"reverse_input_channels": "True"})
    image = np.zeros((1, 2, 2, 3), np.uint8)
    image[..., 0], image[..., 2] = 200, 7
    out = next(iter(repo(tmp_path).get("m").infer(image).values()))
    np.testing.assert_allclose(out[0, :, 0, 0], [7, 0, 200])


def test_inputs_given_as_they_come_get_the_same_result_as_the_models_own_layout(tmp_path):
    write_model(tmp_path / "m" / "1", identity_image(2), {"mean_values": "10 20 30", "scale_values": "2 4 5"})
    model = repo(tmp_path).get("m")
    image = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 20
    expected = next(iter(model.infer(image).values()))  # u8, C-contiguous: set as it is
    strided = np.zeros((1, 2, 4, 3), np.uint8)
    strided[:, :, ::2] = image
    assert not strided[:, :, ::2].flags.c_contiguous
    for given in (strided[:, :, ::2], image.astype(np.int32), {0: image}):
        np.testing.assert_allclose(next(iter(model.infer(given).values())), expected)


def test_an_input_of_the_wrong_shape_is_a_model_error(tmp_path):
    write_model(tmp_path / "m" / "1", identity_image(2))
    model = repo(tmp_path).get("m")
    with pytest.raises(ModelError, match="model 'm' failed to run"):
        model.infer(np.zeros((1, 3, 3, 3), np.uint8))


def test_concurrent_callers_each_get_their_own_result(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(8))
    model = repo(tmp_path).get("m")
    errors: list[str] = []

    def worker(value: int) -> None:
        for _ in range(50):
            image = np.full((1, 8, 8, 3), value, np.uint8)
            out = next(iter(model.infer(image).values()))
            if not np.allclose(out, value):
                errors.append(f"{value}: {out}")

    threads = [threading.Thread(target=worker, args=(v,)) for v in (10, 60, 120, 250)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _spy_requests(model) -> list[bool]:
    """Whether each inference of `model` ran on its latency compilation."""
    used: list[bool] = []
    run = model._run

    def spy(request, inputs):
        used.append(request is model._alone)
        return run(request, inputs)

    model._run = spy
    return used


def test_a_call_running_alone_uses_the_latency_compilation_with_the_same_result(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(8))
    model = ModelRepository(tmp_path, performance_hint="THROUGHPUT", cache_dir=None, latency_when_alone=True).get("m")
    assert model.latency_when_alone
    used = _spy_requests(model)
    for value in (3, 77, 250):
        out = next(iter(model.infer(np.full((1, 8, 8, 3), value, np.uint8)).values()))
        np.testing.assert_allclose(out, value)
    assert used == [True, True, True]


def test_concurrent_calls_share_the_throughput_requests_and_each_gets_its_own_result(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(64))
    model = ModelRepository(tmp_path, performance_hint="THROUGHPUT", cache_dir=None, latency_when_alone=True).get("m")
    used = _spy_requests(model)
    errors: list[str] = []
    start = threading.Barrier(6)

    def worker(value: int) -> None:
        start.wait()
        for _ in range(40):
            out = next(iter(model.infer(np.full((1, 64, 64, 3), value, np.uint8)).values()))
            if not np.allclose(out, value):
                errors.append(f"{value}: {out}")

    threads = [threading.Thread(target=worker, args=(v,)) for v in (1, 10, 60, 120, 200, 250)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(used) == 240 and False in used  # overlapping calls went to the pool


def test_a_call_made_while_another_job_runs_uses_the_throughput_requests(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(8))
    model = ModelRepository(tmp_path, performance_hint="THROUGHPUT", cache_dir=None, latency_when_alone=True).get("m")
    used = _spy_requests(model)
    image = np.full((1, 8, 8, 3), 9, np.uint8)
    with ACTIVE_JOBS.job():  # this job
        model.infer(image)
        with ACTIVE_JOBS.job():  # another one, still decoding its image
            model.infer(image)
    assert used == [True, False]


@pytest.mark.parametrize(("setting", "hint", "expected"), [
    (True, None, True),
    (False, None, False),
    (True, "LATENCY", False),  # a model asking for latency needs no second copy
])
def test_latency_copy_only_where_throughput_is_compiled_and_it_is_asked_for(tmp_path, setting, hint, expected):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(8), {"performance_hint": hint} if hint else None)
    repository = ModelRepository(tmp_path, performance_hint="THROUGHPUT", cache_dir=None, latency_when_alone=setting)
    assert repository.get("m").latency_when_alone is expected


def test_rt_info_labels_override_a_sidecar_label_list(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(), {"labels": "a b c"})
    (tmp_path / "m" / "1" / "model_info.json").write_text(json.dumps({"labels": ["x x", "y", "z"]}))
    assert repo(tmp_path).get("m").info.labels == ("a", "b", "c")


def test_sidecar_label_list_keeps_spaces_for_a_model_without_rt_info(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier())
    (tmp_path / "m" / "1" / "model_info.json").write_text(json.dumps({"labels": ["x x", "y", "z"]}))
    assert repo(tmp_path).get("m").info.labels == ("x x", "y", "z")


def test_a_name_in_several_folders_is_served_from_the_first_and_logged_once(tmp_path, caplog):
    first, second = tmp_path / "own", tmp_path / "aicsd"
    write_model(first / "m" / "1", channel_mean_classifier(), {"labels": "own1 own2 own3"})
    write_model(second / "m" / "4", channel_mean_classifier(), {"labels": "aicsd1 aicsd2 aicsd3"})
    write_model(second / "other" / "1", channel_mean_classifier())
    repository = ModelRepository((first, tmp_path / "missing", second), cache_dir=None)
    with caplog.at_level("WARNING", logger="pipeline.model_repository"):
        found = {e.name: e for e in repository.discover()}
        repository.discover()
    assert set(found) == {"m", "other"} and found["m"].directory == first / "m"
    assert repository.entry("other").directory == second / "other"
    assert repository.get("m").info.labels[0] == "own1"
    assert [r.getMessage() for r in caplog.records] == [f"model m is in {first / 'm'} and in {second / 'm'}: the first is served"]


def test_an_entry_changes_when_its_files_do(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier())
    repository = repo(tmp_path)
    before = repository.entry("m")
    assert repository.entry("m") == before
    with (tmp_path / "m" / "1" / "model.bin").open("ab") as out:
        out.write(b"\0")
    assert repository.entry("m") != before


def test_get_recompiles_a_model_whose_files_changed(tmp_path):
    write_model(tmp_path / "m" / "1", channel_mean_classifier(), {"labels": "a b c"})
    repository = repo(tmp_path)
    first = repository.get("m")
    write_model(tmp_path / "m" / "2", channel_mean_classifier(), {"labels": "x y z"})
    assert repository.get("m") is not first and repository.get("m").info.labels == ("x", "y", "z")
