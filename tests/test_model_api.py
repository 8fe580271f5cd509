"""Model API pipelines in process: real IRs with Geti-style rt_info, real image files, real outputs.

Every expectation is computed from the drawn image in numpy (colour masks, bounding boxes,
channel means, connected regions), never from the pipeline's own output.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as connected_regions

from aicsd.errors import ModelError, ParameterError
from aicsd.job import ModelParams
from pipeline.annotate import MASK_OPACITY, colour
from pipeline.base import PipelineTask
from pipeline.model_api import ModelApiModel, ModelApiPipeline, own_kind
from pipeline.model_repository import ModelRepository
from pipeline.parameters import InvalidParameters, Param, ParameterSchema

from . import model_api_models as models
from .tiny_models import channel_mean_classifier, write_model

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("model-api-models")
    models.write_multiclass(root / "colour-class" / "1")
    models.write_multilabel(root / "colour-tags" / "1")
    models.write_detector(root / "colour-boxes" / "1")
    models.write_segmenter(root / "colour-regions" / "1")
    models.write_anomaly(root / "red-anomaly" / "1")
    models.write_instance_segmenter(root / "colour-instances" / "1")
    models.write_keypoints(root / "colour-corners" / "1")
    models.write_yolo(root / "colour-yolo" / "1")
    return ModelRepository(root, device="CPU", performance_hint="THROUGHPUT", cache_dir=None)


_pipelines: dict[str, ModelApiPipeline] = {}


def pipeline_of(repository: ModelRepository, name: str) -> ModelApiPipeline:
    if name not in _pipelines:
        entry, entries = repository.describe(name)
        assert entry.model_file is not None
        model = ModelApiModel(name, entry.model_file, entries, core=repository.core)
        _pipelines[name] = ModelApiPipeline(model, max_pixels=10_000_000)
    return _pipelines[name]


def draw(size: int, *shapes: tuple[tuple[int, int, int, int], tuple[int, int, int]]) -> np.ndarray:
    """A black size x size RGB image with filled rectangles ((x1, y1, x2, y2) end-exclusive, colour)."""
    rgb = np.zeros((size, size, 3), np.uint8)
    for (x1, y1, x2, y2), shade in shapes:
        rgb[y1:y2, x1:x2] = shade
    return rgb


def run(pipeline: ModelApiPipeline, rgb: np.ndarray, folder: Path, **params: str):
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"input-{len(list(folder.iterdir()))}.png"
    Image.fromarray(rgb).save(image)
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    with PipelineTask.local(image, folder, ModelParams(params), log) as task:
        outcome = pipeline.run(task)
    return outcome, json.loads(outcome.results)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class TestMultiClass:
    def test_top_labels_and_scores_are_the_softmax_of_the_channel_means(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 40, 64), RED), ((40, 0, 64, 16), BLUE))
        outcome, results = run(pipeline_of(repository, "colour-class"), rgb, tmp_path, TopK="2")
        expected = softmax(10 * rgb.reshape(-1, 3).mean(axis=0) / 255)
        order = np.argsort(-expected)[:2]
        assert results["model"] == "colour-class"
        assert [t["label"] for t in results["top"]] == [models.COLOURS[i] for i in order]
        assert [t["index"] for t in results["top"]] == [int(i) for i in order]
        assert [t["score"] for t in results["top"]] == pytest.approx([expected[i] for i in order], abs=1e-3)
        assert outcome.qc_flags == "" and outcome.output_files == ()

    def test_a_top_score_below_min_confidence_is_flagged(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 64, 64), (128, 128, 128)))  # equal channel means: 1/3 each
        outcome, results = run(pipeline_of(repository, "colour-class"), rgb, tmp_path, MinConfidence="0.4")
        assert results["top"][0]["score"] == pytest.approx(1 / 3, abs=1e-3)
        assert outcome.qc_flags == "LowConfidence"


class TestMultiLabel:
    def test_every_label_above_the_threshold_is_reported_with_the_count_first(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 64, 64), YELLOW))
        outcome, results = run(pipeline_of(repository, "colour-tags"), rgb, tmp_path)
        assert next(iter(results)) == "Count" and results["Count"] == 2
        assert {item["Label"] for item in results["Labels"]} == {"red", "green"}
        assert all(item["Score"] == pytest.approx(sigmoid(10), abs=1e-4) for item in results["Labels"])
        assert outcome.qc_flags == ""

    def test_the_job_threshold_filters_the_labels(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 64, 40), RED), ((0, 40, 64, 64), GREEN))  # means R 0.625, G 0.375
        pipeline = pipeline_of(repository, "colour-tags")
        _, results = run(pipeline, rgb, tmp_path)
        assert [(i["Label"], i["Score"]) for i in results["Labels"]] == [("red", pytest.approx(sigmoid(2.5), abs=1e-4))]
        outcome, results = run(pipeline, rgb, tmp_path, ConfidenceThreshold="0.95")
        assert results == {"Count": 0, "Labels": [], "Model": "colour-tags"} and outcome.qc_flags == "NoLabels"
        _, results = run(pipeline, rgb, tmp_path, ConfidenceThreshold="0.07")  # sigmoid(-2.5) = 0.076
        assert [i["Label"] for i in results["Labels"]] == ["red", "green"]


def expected_boxes(rgb: np.ndarray) -> dict[str, tuple[list[int], float]]:
    """Per colour: the bounding box (x1, y1, x2 end-exclusive, y2) of its pixels and their fill ratio."""
    out = {}
    for name, mask in models.colour_pixels(rgb).items():
        ys, xs = np.nonzero(mask)
        if len(xs):
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            out[name] = (box, mask.sum() / ((box[2] - box[0]) * (box[3] - box[1])))
    return out


class TestDetection:
    def test_boxes_labels_and_scores_of_drawn_rectangles_and_an_annotated_png(self, repository, tmp_path):
        rgb = draw(64, ((6, 4, 30, 20), RED), ((40, 30, 60, 50), GREEN), ((2, 40, 8, 46), BLUE),
                   ((24, 56, 30, 62), BLUE))  # two small blue squares: one sparse box
        outcome, results = run(pipeline_of(repository, "colour-boxes"), rgb, tmp_path, ConfidenceThreshold="0.1")
        truth = expected_boxes(rgb)
        assert list(results)[:2] == ["Count", "Objects"] and results["Count"] == 3
        got = {o["Label"]: (o["Box"], o["Score"]) for o in results["Objects"]}
        assert set(got) == set(truth)
        for name, (box, score) in truth.items():
            assert got[name][0] == box and got[name][1] == pytest.approx(score, abs=1e-4)
        assert [o["Score"] for o in results["Objects"]] == sorted((o["Score"] for o in results["Objects"]), reverse=True)

        (picture,) = outcome.output_files
        assert picture.path.name.endswith("-detected.png") and picture.path.parent == tmp_path
        with Image.open(picture.path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
            drawn = np.asarray(image.convert("RGB"))
        x1, y1, _, y2 = truth["green"][0]
        assert tuple(drawn[(y1 + y2) // 2, x1]) == colour(models.COLOURS.index("green"))

    def test_the_default_threshold_is_the_models_own_and_max_objects_limits_the_list(self, repository, tmp_path):
        rgb = draw(64, ((6, 4, 30, 20), RED), ((40, 30, 60, 50), GREEN), ((2, 40, 8, 46), BLUE),
                   ((24, 56, 30, 62), BLUE))
        pipeline = pipeline_of(repository, "colour-boxes")
        _, results = run(pipeline, rgb, tmp_path)  # the model says 0.5: the sparse blue box goes
        assert results["Count"] == 2 and {o["Label"] for o in results["Objects"]} == {"red", "green"}
        _, results = run(pipeline, rgb, tmp_path, MaxObjects="1")
        assert results["Count"] == 2 and len(results["Objects"]) == 1

    def test_boxes_are_in_the_pixels_of_an_image_larger_than_the_model_input(self, repository, tmp_path):
        rgb = draw(128, ((12, 8, 60, 40), RED), ((80, 60, 120, 100), GREEN))
        _, results = run(pipeline_of(repository, "colour-boxes"), rgb, tmp_path)
        got = {o["Label"]: o["Box"] for o in results["Objects"]}
        for name, (box, _) in expected_boxes(rgb).items():
            assert got[name] == pytest.approx(box, abs=2)

    def test_nothing_found_is_flagged_and_still_pictured(self, repository, tmp_path):
        outcome, results = run(pipeline_of(repository, "colour-boxes"), draw(64), tmp_path)
        assert results["Count"] == 0 and results["Objects"] == [] and outcome.qc_flags == "NoObjects"
        assert len(outcome.output_files) == 1 and outcome.output_files[0].path.is_file()


    def test_a_yolo_export_maps_letterboxed_boxes_back_to_the_image(self, repository, tmp_path):
        rgb = np.zeros((64, 128, 3), np.uint8)  # wide: letterboxed into 64x64 with 16 rows of padding
        rgb[8:40, 10:50] = RED
        rgb[20:60, 80:120] = BLUE
        _, results = run(pipeline_of(repository, "colour-yolo"), rgb, tmp_path)
        got = {o["Label"]: o["Box"] for o in results["Objects"]}
        truth = {name: box for name, (box, _) in expected_boxes(rgb).items()}
        assert results["Count"] == 2 and set(got) == set(truth) == {"red", "blue"}
        for name, box in truth.items():
            assert got[name] == pytest.approx(box, abs=2)


class TestInstanceSegmentation:
    def test_objects_carry_their_mask_area_and_the_picture_tints_the_masks(self, repository, tmp_path):
        rgb = draw(64, ((6, 4, 30, 20), RED), ((40, 30, 60, 50), GREEN))
        outcome, results = run(pipeline_of(repository, "colour-instances"), rgb, tmp_path)
        masks = models.colour_pixels(rgb)
        truth = expected_boxes(rgb)
        assert results["Count"] == 2
        assert {o["Label"]: (o["Box"], o["Area"]) for o in results["Objects"]} == {
            name: (truth[name][0], int(masks[name].sum())) for name in ("red", "green")}
        (picture,) = outcome.output_files
        with Image.open(picture.path) as image:
            drawn = np.asarray(image.convert("RGB")).astype(float)
        # the mask's class colour is the label index + 1 (index 0 of the class map is "nothing")
        red_index = next(int(i) for i, n in enumerate(["background", *models.COLOURS]) if n == "red")
        tinted = np.array(RED) * (1 - MASK_OPACITY) + np.array(colour(red_index + 1)) * MASK_OPACITY
        assert drawn[12, 18] == pytest.approx(tinted, abs=1)


class TestKeypoints:
    def test_each_colour_s_keypoint_is_its_top_left_corner_and_missing_ones_are_not_reported(
        self, repository, tmp_path
    ):
        rgb = draw(64, ((6, 4, 30, 20), RED), ((40, 30, 60, 50), GREEN))
        outcome, results = run(pipeline_of(repository, "colour-corners"), rgb, tmp_path)
        expected = []
        for name, mask in models.colour_pixels(rgb).items():
            ys, xs = np.nonzero(mask)
            if len(xs):
                expected.append({"Label": name, "X": float(xs.min()), "Y": float(ys.min()), "Score": 1.0})
        assert results == {"Count": 2, "Keypoints": expected, "Model": "colour-corners"}
        assert outcome.output_files[0].path.name.endswith("-keypoints.png")


class TestSegmentation:
    def test_per_class_areas_and_regions_and_a_tinted_picture(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 10, 10), RED), ((20, 20, 30, 25), RED), ((40, 40, 64, 64), BLUE))
        outcome, results = run(pipeline_of(repository, "colour-regions"), rgb, tmp_path, MinArea="2")
        masks = models.colour_pixels(rgb)
        expected = [
            {"Label": name, "Index": i + 1, "Pixels": int(masks[name].sum()),
             "Fraction": round(masks[name].sum() / masks[name].size, 4),
             "Regions": int(connected_regions(masks[name], connectivity=2).max())}
            for i, name in enumerate(models.COLOURS) if masks[name].any()
        ]
        assert results["Classes"] == expected
        assert next(iter(results)) == "Count" and results["Count"] == 3 and outcome.qc_flags == ""
        (picture,) = outcome.output_files
        with Image.open(picture.path) as image:
            drawn = np.asarray(image.convert("RGB")).astype(float)
        tinted = np.array(RED) * (1 - MASK_OPACITY) + np.array(colour(1)) * MASK_OPACITY
        assert drawn[5, 5] == pytest.approx(tinted, abs=1) and tuple(drawn[15, 15]) == (0, 0, 0)

    def test_regions_smaller_than_min_area_are_not_counted(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 10, 10), GREEN), ((30, 30, 32, 32), GREEN))
        _, results = run(pipeline_of(repository, "colour-regions"), rgb, tmp_path, MinArea="5")
        assert results["Count"] == 1 and results["Classes"][0]["Pixels"] == 104

    def test_an_image_of_background_only_is_flagged(self, repository, tmp_path):
        outcome, results = run(pipeline_of(repository, "colour-regions"), draw(64), tmp_path)
        assert results["Count"] == 0 and results["Classes"] == [] and outcome.qc_flags == "NoObjects"


class TestAnomaly:
    def test_a_red_patch_is_anomalous_and_its_area_reported(self, repository, tmp_path):
        rgb = draw(64, ((0, 0, 16, 16), RED))
        outcome, results = run(pipeline_of(repository, "red-anomaly"), rgb, tmp_path)
        assert results["Label"] == "Anomalous" and results["Score"] == 1.0
        assert results["AnomalousArea"] == pytest.approx(256 / 4096, abs=1e-3)
        assert outcome.qc_flags == "Anomalous" and outcome.output_files[0].path.name.endswith("-anomaly.png")

    def test_an_image_without_red_is_normal(self, repository, tmp_path):
        outcome, results = run(pipeline_of(repository, "red-anomaly"), draw(64, ((0, 0, 16, 16), GREEN)), tmp_path)
        assert results["Label"] == "Normal" and results["Score"] == 0.0 and outcome.qc_flags == ""


class TestParameters:
    def test_every_bad_key_is_named_in_one_error_and_unknown_keys_are_ignored(self, repository, tmp_path):
        pipeline = pipeline_of(repository, "colour-boxes")
        params = ModelParams({"ConfidenceThreshold": "high", "MaxObjects": "0", "Brightness": "0"})
        with pytest.raises(InvalidParameters) as caught:
            pipeline.schema.parse(params)
        assert isinstance(caught.value, ParameterError) and caught.value.keys == ["ConfidenceThreshold", "MaxObjects"]
        message = str(caught.value)
        assert message.startswith("ModelParams ConfidenceThreshold: must be a number, got 'high'")
        assert "MaxObjects: must be between 1 and 10000, got 0" in message

    def test_the_schema_describes_name_type_default_range_and_meaning(self, repository):
        described = pipeline_of(repository, "colour-boxes").describe()
        assert described["model_type"] == "SSD" and described["kind"] == "detection"
        threshold = described["parameters"][0]
        assert threshold == {"name": "ConfidenceThreshold", "type": "number", "default": 0.5, "min": 0.05,
                             "max": 1.0, "description": threshold["description"]}

    def test_a_schema_parses_case_insensitive_keys_with_defaults(self):
        schema = ParameterSchema(Param("TopK", "integer", 5, "k", minimum=1, maximum=10),
                                 Param("Mode", "choice", "fast", "m", choices=("fast", "exact")))
        assert schema.parse(ModelParams({"topk": "3", "MODE": "EXACT"})) == {"TopK": 3, "Mode": "exact"}
        assert schema.parse(ModelParams({})) == {"TopK": 5, "Mode": "fast"}
        assert schema.with_defaults({"TopK": {"default": 2}}).parse(ModelParams({})) == {"TopK": 2, "Mode": "fast"}


class TestModelsWithoutUsableMetadata:
    def test_a_model_without_model_type_fails_saying_what_to_add(self, tmp_path):
        write_model(tmp_path / "bare" / "1", channel_mean_classifier(8))
        repository = ModelRepository(tmp_path, cache_dir=None)
        entry, entries = repository.describe("bare")
        with pytest.raises(ModelError) as caught:
            ModelApiModel("bare", entry.model_file, entries, core=repository.core)
        message = str(caught.value)
        assert "model_type" in message and "model_info.json" in message and "SSD" in message

    def test_a_model_info_json_beside_a_bare_ir_makes_it_a_detector(self, tmp_path):
        version = tmp_path / "boxes" / "1"
        write_model(version, models.colour_box_detector())
        (version / "model_info.json").write_text(json.dumps({"model_type": "SSD", "labels": ["red", "green", "blue"],
                                                             **models.GETI_PREPROCESSING}))
        repository = ModelRepository(tmp_path, cache_dir=None)
        entry, entries = repository.describe("boxes")
        pipeline = ModelApiPipeline(ModelApiModel("boxes", entry.model_file, entries, core=repository.core),
                                    max_pixels=10_000_000)
        _, results = run(pipeline, draw(64, ((6, 4, 30, 20), GREEN)), tmp_path / "out")
        assert results["Objects"] == [{"Label": "green", "Score": 1.0, "Box": [6, 4, 30, 20]}]

    def test_a_model_type_the_library_does_not_know_is_named(self, tmp_path):
        write_model(tmp_path / "odd" / "1", channel_mean_classifier(8), {"model_type": "Hologram"})
        repository = ModelRepository(tmp_path, cache_dir=None)
        entry, entries = repository.describe("odd")
        with pytest.raises(ModelError, match="model_type 'Hologram', which no pipeline serves"):
            ModelApiModel("odd", entry.model_file, entries, core=repository.core)

    def test_outputs_the_wrapper_cannot_read_are_a_model_error(self, tmp_path):
        write_model(tmp_path / "bad" / "1", channel_mean_classifier(8), {"model_type": "SSD"})
        repository = ModelRepository(tmp_path, cache_dir=None)
        entry, entries = repository.describe("bad")
        with pytest.raises(ModelError, match="model_type SSD.*cannot be served by openvino-model-api"):
            ModelApiModel("bad", entry.model_file, entries, core=repository.core)


def test_which_models_our_own_kinds_serve():
    assert own_kind({"model_type": "Classification", "aicsd_pipeline": "Classification"}) == "Classification"
    assert own_kind({"model_type": "BlobCounting"}) == "BlobCounting"
    assert own_kind({"model_type": "Classification", "multilabel": "True"}) == ""
    assert own_kind({"model_type": "ssd"}) == ""  # older Geti exports spell it in lower case


def test_jobs_on_several_threads_each_get_their_own_image_s_boxes(repository, tmp_path):
    pipeline = pipeline_of(repository, "colour-boxes")
    rng = np.random.default_rng(7)
    images = []
    for _ in range(24):
        x, y = (int(v) for v in rng.integers(0, 40, 2))
        w, h = (int(v) for v in rng.integers(4, 24, 2))
        images.append(draw(64, ((x, y, x + w, y + h), RED)))

    def one(i: int) -> list[int]:
        _, results = run(pipeline, images[i], tmp_path / str(i))
        return results["Objects"][0]["Box"]

    with ThreadPoolExecutor(4) as pool:
        boxes = list(pool.map(one, range(len(images))))
    assert boxes == [expected_boxes(rgb)["red"][0] for rgb in images]


def test_our_own_kinds_declare_their_parameters_and_name_every_bad_key_too():
    from pipeline.classification import ClassificationParams
    from pipeline.counting import CountingParams
    from pipeline.model_repository import ModelInfo

    with pytest.raises(InvalidParameters) as caught:
        CountingParams.from_params(ModelParams({"Polarity": "up", "Threshold": "5", "Brightness": "0"}), ModelInfo())
    assert caught.value.keys == ["Polarity", "Threshold"]
    assert [p["name"] for p in CountingParams.schema(ModelInfo()).describe()] == [
        "Polarity", "MinDiameter", "MaxDiameter", "Threshold"]
    top_k = ClassificationParams.schema(1000).describe()[0]
    assert (top_k["name"], top_k["default"], top_k["min"], top_k["max"]) == ("TopK", 5, 1, 1000)


def test_the_bundled_classifier_keeps_our_own_kind(efficientnet_dir):
    repository = ModelRepository(efficientnet_dir.parent, cache_dir=None)
    _, entries = repository.describe("efficientnet-lite0")
    assert entries["model_type"] == "Classification" and own_kind(entries) == "Classification"
