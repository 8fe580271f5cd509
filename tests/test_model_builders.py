"""Model builders: the legacy PyTorch reader (without PyTorch) and the real EfficientNet-Lite0."""

from __future__ import annotations

import json
import pickle
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from PIL import Image

from model_builders.efficientnet_lite import weights_path, write_efficientnet_lite0
from model_builders.torch_legacy import LEGACY_MAGIC, load_legacy_state_dict


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> tuple[object, dict[str, type]]:
    """Stand-in `torch` modules so that pickle writes the same global references a real file has."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: the reader resolves this name itself
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storage_types[name] = cls
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return _rebuild_tensor_v2, storage_types


def _write_legacy(path: Path, tensors: dict, storages: dict[str, np.ndarray], monkeypatch) -> None:
    """A legacy-format file whose tensors name (storage key, offset, shape, stride) into `storages`."""
    rebuild, storage_types = _fake_torch(monkeypatch)
    kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}

    class Ref:
        def __init__(self, key: str) -> None:
            self.key = key

    class Tensor:
        def __init__(self, key, offset, shape, stride) -> None:
            self.args = (Ref(key), offset, shape, stride, False, OrderedDict())

        def __reduce__(self):
            return (rebuild, self.args)

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Ref):
                data = storages[obj.key]
                return ("storage", storage_types[kinds[data.dtype]], obj.key, "cpu", data.size)
            return None

    state = OrderedDict((name, Tensor(*spec)) for name, spec in tensors.items())
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        Writer(handle, protocol=2).dump(state)
        pickle.dump(list(storages), handle, protocol=2)
        for data in storages.values():
            handle.write(struct.pack("<q", data.size))
            handle.write(data.tobytes())


def test_reader_rebuilds_tensors_with_offsets_and_strides(tmp_path, monkeypatch):
    base = np.arange(24, dtype=np.float32)
    path = tmp_path / "state.pth"
    _write_legacy(
        path,
        {
            "plain": ("0", 0, (2, 3), (3, 1)),
            "offset": ("0", 6, (3,), (1,)),
            "transposed": ("0", 0, (3, 2), (1, 3)),
            "count": ("1", 0, (), ()),
        },
        {"0": base, "1": np.array([7], np.int64)},
        monkeypatch,
    )
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delitem(sys.modules, "torch._utils")
    state = load_legacy_state_dict(path)
    assert list(state) == ["plain", "offset", "transposed", "count"]
    np.testing.assert_array_equal(state["plain"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(state["offset"], base[6:9])
    np.testing.assert_array_equal(state["transposed"], base[:6].reshape(2, 3).T)
    assert state["count"] == 7 and state["count"].dtype == np.int64


def test_truncated_storage_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "cut.pth"
    _write_legacy(path, {"w": ("0", 0, (4,), (1,))}, {"0": np.ones(4, np.float32)}, monkeypatch)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_legacy_state_dict(path)


def test_pickle_that_names_any_other_class_is_refused(tmp_path):
    import os

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, handle, protocol=2)

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

        pickle.dump(Evil(), handle, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_legacy_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_zip_format_and_non_pytorch_files_are_refused(tmp_path):
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="zip-format"):
        load_legacy_state_dict(zipped)
    other = tmp_path / "other.pth"
    with open(other, "wb") as handle:
        pickle.dump(12345, handle, protocol=2)
    with pytest.raises(ValueError, match="bad magic"):
        load_legacy_state_dict(other)


def test_real_package_weights_are_read():
    state = load_legacy_state_dict(weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and np.isfinite(state["_fc.weight"]).all()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> ov.Model:
    path = write_efficientnet_lite0(tmp_path_factory.mktemp("models") / "efficientnet-lite0" / "1")
    return ov.Core().read_model(path)


def _info(model: ov.Model, key: str) -> str:
    return model.get_rt_info(["model_info", key]).astype(str)


def _preprocess(image: np.ndarray, mean: list[float], scale: list[float]) -> np.ndarray:
    picture = Image.fromarray(image)
    factor = 256 / min(picture.size)
    picture = picture.resize((round(picture.width * factor), round(picture.height * factor)), Image.Resampling.BILINEAR)
    left, top = (picture.width - 224) // 2, (picture.height - 224) // 2
    pixels = np.asarray(picture.crop((left, top, left + 224, top + 224)), np.float32)
    return ((pixels - np.array(mean, np.float32)) / np.array(scale, np.float32)).transpose(2, 0, 1)[np.newaxis]


def test_model_describes_itself_in_rt_info(built):
    assert _info(built, "model_type") == "Classification"
    names = json.loads(_info(built, "label_names"))
    assert len(names) == 1000 and names[281] == "tabby, tabby cat" and names[967] == "espresso"
    assert _info(built, "labels").split()[281] == "tabby,_tabby_cat"
    assert (_info(built, "resize_type"), _info(built, "crop_fraction")) == ("crop", "0.875")
    assert built.input(0).get_any_name() == "image" and "logits" in built.output(0).get_names()


@pytest.mark.parametrize("photo, expected", [("chelsea", range(281, 286)), ("coffee", (967, 968))])
def test_real_photos_are_classified_correctly(built, photo, expected):
    from skimage import data

    mean = [float(v) for v in _info(built, "mean_values").split()]
    scale = [float(v) for v in _info(built, "scale_values").split()]
    compiled = ov.Core().compile_model(built, "CPU")
    logits = compiled(_preprocess(getattr(data, photo)(), mean, scale))[0][0]
    assert int(np.argmax(logits)) in expected


def test_build_is_skipped_when_the_model_is_up_to_date(tmp_path):
    target = write_efficientnet_lite0(tmp_path / "1")
    before = target.stat().st_mtime_ns
    assert write_efficientnet_lite0(tmp_path / "1") == target
    assert target.stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["model.bin", "model.xml"]


def test_cell_counter_finds_a_known_blob_on_any_image_size(tmp_path):
    from model_builders.cell_counter import dog_sigmas, write_cell_counter

    model = ov.Core().read_model(write_cell_counter(tmp_path / "1"))
    assert _info(model, "model_type") == "BlobCounting"
    assert [float(s) for s in _info(model, "sigmas").split()] == pytest.approx(dog_sigmas(), rel=1e-5)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for height, width in ((100, 140), (257, 255)):
        yy, xx = np.mgrid[:height, :width]
        blob = np.exp(-((yy - 40) ** 2 + (xx - 70) ** 2) / (2 * 3.0**2)).astype(np.float32)
        result = compiled([blob[np.newaxis, np.newaxis], np.float32(0.1)])
        indices, values = result["peak_indices"], result["peak_values"]
        best = indices[np.argmax(values)]
        assert (best[2], best[3]) == (40, 70)
        assert dog_sigmas()[best[1]] == pytest.approx(3.0, rel=0.15)
