"""Loading framework pickles without the framework: restricted unpicklers and a torch-free
reader of `torch.save` archives.

A pickle names the functions and classes it needs by module and name; `pickle.Unpickler`
imports and calls them. `Restricted.find_class` instead maps a short allowlist (the
framework classes a reader needs -> small local stand-ins; numpy's array rebuild; torch's
tensor rebuild -> numpy) and refuses every other name with a one-line error, so loading a
dump never imports verl, SkyRL or tensordict and never calls anything else. The files are
still pickles: `mismatch import` asks for --trust-pickle before opening one.

`load_torch_zip` reads the bytes of a `torch.save` archive (zip: `<name>/data.pkl` plus one
file per storage under `<name>/data/`) into numpy: plain tensors and tensordict's
consolidated TensorDict (verl's batch), bfloat16 widened to float32 exactly.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import MismatchError

# torch storage class names -> numpy dtype ("bf16": read as uint16, widened to float32)
STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bf16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# dtype names as tensordict and verl write them ("torch.int64" or "int64")
NAMED_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": "bf16",
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}

# numpy's own rebuild functions (arrays, scalars, dtypes) under both module spellings.
_NUMPY = {
    (mod, name)
    for base in ("numpy.core", "numpy._core")
    for mod, name in (
        (f"{base}.multiarray", "_reconstruct"),
        (f"{base}.multiarray", "scalar"),
        (f"{base}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype")}
_SAFE_BUILTINS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes this way
    ("collections", "OrderedDict"),
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is float32's top 16 bits)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def as_dtype(name: str, where: str) -> Any:
    """numpy dtype of a dtype name ('torch.float32', 'float32', 'bfloat16', ...)."""
    key = str(name).removeprefix("torch.")
    if key not in NAMED_DTYPES:
        raise MismatchError(f"{where}: unsupported tensor dtype {name}")
    return NAMED_DTYPES[key]


def from_bytes(data: bytes | memoryview | np.ndarray, dtype: Any, shape: Any) -> np.ndarray:
    """An array of `shape` from raw little-endian bytes (bf16 widened to float32)."""
    buf = (
        np.frombuffer(data, dtype=np.uint8)
        if not isinstance(data, np.ndarray)
        else data.view(np.uint8)
    )
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if dtype == "bf16":
        return bf16_to_f32(buf.view(np.uint16)[:n]).reshape(shape)
    return buf.view(dtype)[:n].reshape(shape)


class Restricted(pickle.Unpickler):
    """An Unpickler that resolves only `allowed` (module, name) -> object, plus numpy's
    rebuild functions and a few harmless builtins; anything else is refused by name."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any], where: str) -> None:
        super().__init__(file)
        self.allowed = allowed
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self.allowed:
            return self.allowed[key]
        if key in _NUMPY or key in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise MismatchError(
            f"{self.where}: refusing to load {module}.{name} from the pickle (only the "
            "framework's batch classes, numpy arrays and tensors are read)"
        )


def restricted_load(data: bytes, allowed: dict[tuple[str, str], Any], where: str) -> Any:
    """Unpickle `data` with `Restricted`; a one-line error if it is not a pickle."""
    try:
        return Restricted(io.BytesIO(data), allowed, where).load()
    except MismatchError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError) as e:  # fmt: skip
        raise MismatchError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- torch.save


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied."""
    data, dtype = storage
    flat = (
        bf16_to_f32(np.frombuffer(data, np.uint16))
        if dtype == "bf16"
        else np.frombuffer(data, dtype)
    )
    size = tuple(int(s) for s in size)
    if not size:
        return flat[offset : offset + 1].reshape(())
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if tuple(stride) == contiguous:
        return flat[offset : offset + int(np.prod(size))].reshape(size)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, tuple(int(s) * flat.itemsize for s in stride)
    )
    return view.copy()


def _consolidated_td(meta: dict[str, Any], flat: np.ndarray) -> dict[str, np.ndarray]:
    """tensordict._reductions._rebuild_tensordict_files_consolidated in numpy: every leaf
    is a slice [start:stop] of one uint8 storage, viewed as its dtype and shape."""
    raw = np.asarray(flat).view(np.uint8).ravel()
    out: dict[str, np.ndarray] = {}
    for key, leaf in meta.get("leaves", {}).items():
        if str(key).startswith("<NJT"):
            raise MismatchError("nested (jagged) tensors in a TensorDict are not supported")
        dtype, shape, start, stop = leaf[0], leaf[1], int(leaf[2]), int(leaf[3])
        out[key] = from_bytes(raw[start:stop], as_dtype(dtype, "TensorDict"), shape).copy()
    return out


def load_torch_zip(data: bytes, where: str, extra: dict[tuple[str, str], Any] | None = None) -> Any:
    """The object a `torch.save` archive holds, with tensors as numpy arrays and a
    consolidated TensorDict as {key: array}. Torch is not imported."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, StopIteration) as e:
        raise MismatchError(f"{where}: not a torch.save archive") from e
    prefix = pkl[: -len("data.pkl")]
    storages: dict[str, Any] = {}

    def storage_type(name: str) -> Callable[[], str]:
        return lambda: name  # only its name is used, as the dtype of the storage

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("tensordict._reductions", "_rebuild_tensordict_files_consolidated"): _consolidated_td,
        ("torch", "Size"): tuple,
        **{("torch", n): n for n in STORAGE_DTYPES},
        **(extra or {}),
    }

    class _Zip(Restricted):
        def persistent_load(self, pid: Any) -> Any:
            kind, stype, key, _loc, _numel = pid
            if kind != "storage":
                raise MismatchError(f"{where}: unexpected persistent id {kind!r}")
            name = stype if isinstance(stype, str) else getattr(stype, "__name__", str(stype))
            if name not in STORAGE_DTYPES:
                raise MismatchError(f"{where}: unsupported tensor storage {name}")
            if key not in storages:
                storages[key] = (z.read(f"{prefix}data/{key}"), STORAGE_DTYPES[name])
            return storages[key]

    try:
        return _Zip(io.BytesIO(z.read(pkl)), allowed, where).load()
    except MismatchError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as e:
        raise MismatchError(f"{where}: cannot read the torch.save archive ({e})") from e


def read_bytes(path: Any) -> bytes:
    """A whole file (a pickle is read in one piece; memory is bounded by one file)."""
    with open(path, "rb") as f:
        return f.read()


__all__ = [
    "Restricted",
    "as_dtype",
    "bf16_to_f32",
    "from_bytes",
    "load_torch_zip",
    "read_bytes",
    "restricted_load",
]
