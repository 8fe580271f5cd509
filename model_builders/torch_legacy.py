"""Reading a legacy-format (pre-zip) PyTorch state dict without PyTorch.

The legacy format is a short sequence of pickles (magic number, protocol version, system
information, the state dict whose tensors name their storages through `persistent_id`, the list
of storage keys) followed by each storage in that order as an 8-byte little-endian element
count and its raw bytes. Only the handful of classes a state dict needs are resolved; anything
else in the pickle is refused, so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_legacy_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: Any


@dataclass
class _Storage:
    key: str
    dtype: Any
    size: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        assert self.storage.data is not None
        item = self.storage.data.itemsize
        if not self.shape:
            return self.storage.data[self.offset : self.offset + 1].reshape(()).copy()
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(
    storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a state dict holds; storages become placeholders filled in later."""

    def __init__(self, handle: io.BufferedReader, storages: dict[str, _Storage]) -> None:
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model file")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, size[, view_metadata])
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, size = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("unsupported storage type")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return self.storages.setdefault(key, _Storage(key, storage_type.dtype, size))


def load_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy PyTorch state dict file, by name, in file order."""
    with open(path, "rb") as handle:
        if handle.read(2) == b"PK":
            raise ValueError(f"{path} is a zip-format PyTorch file; only the legacy format is supported")
        handle.seek(0)
        storages: dict[str, _Storage] = {}
        try:
            magic = pickle.load(handle)
            if magic != LEGACY_MAGIC:
                raise ValueError(f"{path} is not a legacy PyTorch file (bad magic number)")
            pickle.load(handle)  # protocol version
            pickle.load(handle)  # system information
            state = _StateDictUnpickler(handle, storages).load()
            keys = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable legacy PyTorch state dict: {exc}") from None
        for key in keys:
            storage = storages.get(str(key))
            header = handle.read(8)
            if storage is None or len(header) != 8:
                raise ValueError(f"{path}: storage {key!r} is missing or truncated")
            (count,) = struct.unpack("<q", header)
            nbytes = count * np.dtype(storage.dtype).itemsize
            raw = handle.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: storage {key!r} is truncated")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {str(name): ref.array() for name, ref in state.items() if isinstance(ref, _TensorRef)}
