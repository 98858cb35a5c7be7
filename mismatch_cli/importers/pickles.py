"""Loading framework pickles without the framework: restricted unpicklers and a torch-free
reader of `torch.save` archives.

A pickle names the functions and classes it needs by module and name; `pickle.Unpickler`
imports and calls them. `Restricted.find_class` instead maps a short allowlist of exact
names to small local stand-ins (the framework classes a reader needs; numpy's array,
scalar and dtype rebuilds; torch's tensor rebuild -> numpy) and refuses every other name
with a one-line error, so loading a dump never imports verl, SkyRL or tensordict and
never calls anything from the file. Nothing the file names is run: --trust-pickle widens
what is READ (which files are opened), never what is RUN.

numpy's own rebuild functions are not handed to the pickle either: `numpy.dtype` trusts
the flags a pickle gives it (a structured dtype holding an object field can be declared
object-free), and `numpy.ndarray(shape, object, buffer)` turns raw bytes into object
pointers: both turn a crafted file into a forged pointer. The stand-ins below accept only
plain dtypes (bool, integers, floats, complex, str, bytes, object), rebuild arrays through
numpy's list path for object arrays and from exactly-sized bytes otherwise, and refuse
structured dtypes, subarrays and direct `ndarray(...)` calls.

`load_torch_zip` reads the bytes of a `torch.save` archive (zip: `<name>/data.pkl` plus one
file per storage under `<name>/data/`) into numpy: plain tensors and tensordict's
consolidated TensorDict (verl's batch), bfloat16 widened to float32 exactly.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
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

_SAFE_BUILTINS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),  # protocol-2 pickles spell b"" this way
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
    """An array of `shape` from raw little-endian bytes (bf16 widened to float32); a
    ValueError when the bytes are not a plain buffer of at least that many values."""
    if isinstance(data, np.ndarray) and data.dtype.hasobject:
        raise ValueError("an object array is not a tensor's bytes")
    buf = (
        np.frombuffer(data, dtype=np.uint8)
        if not isinstance(data, np.ndarray)
        else np.ascontiguousarray(data).view(np.uint8).ravel()
    )
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative tensor shape {list(shape)}")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype == "bf16":
        return bf16_to_f32(buf.view(np.uint16)[:n]).reshape(shape)
    return buf.view(dtype)[:n].reshape(shape)


# ----------------------------------------------------------------------------- numpy


class RefusedPickle(MismatchError):
    """A pickle asked for something the restricted loaders do not read (raised while the
    file is read: nothing from it ran)."""


# dtype specs numpy writes for plain dtypes (`np.dtype(x).__reduce__()[1][0]`)
_DTYPE_SPEC = re.compile(r"(b1|[iu][1248]|f[248]|c8|c16|O8?|[US]\d{1,9})")
_BYTE_ORDERS = ("<", ">", "|", "=")


class _DType:
    """Stand-in for `numpy.dtype(spec, align, copy)` in a pickle: records the spec and, from
    the state a pickle BUILDs it with, only the byte order. `resolve()` is the real dtype,
    made by numpy from the spec alone (never from the pickle's flags or fields)."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
            raise RefusedPickle(
                f"refusing numpy dtype {spec!r} (only bool, integer, float, complex, str, "
                "bytes and object dtypes are read)"
            )
        self.spec, self.order = spec, "|"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in _BYTE_ORDERS:
            raise RefusedPickle("refusing a numpy dtype with an unexpected pickled state")
        if any(x is not None for x in state[2:5]):  # subarray, names, fields
            raise RefusedPickle("refusing a structured numpy dtype (fields or subarrays)")
        self.order = state[1]

    def resolve(self) -> np.dtype:
        dt = np.dtype(self.spec)
        return dt.newbyteorder(self.order) if self.order in ("<", ">") else dt


def _real_dtype(dt: Any) -> np.dtype:
    if not isinstance(dt, _DType):
        raise RefusedPickle(f"refusing a numpy value whose dtype is a {type(dt).__name__}")
    return dt.resolve()


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise RefusedPickle(f"refusing a numpy array of shape {shape!r}")
    return shape


class _NdarrayName:
    """What `numpy.ndarray` names in a pickle: only the first argument of `_reconstruct`.
    Called directly (`ndarray(shape, object, buffer)` forges object pointers) it refuses."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RefusedPickle("refusing a direct numpy.ndarray(...) call in the pickle")


class _Array(np.ndarray):
    """An array rebuilt by `_reconstruct`: its `__setstate__` checks the pickled state and
    hands numpy a dtype made from the spec, so numpy's own checks hold (an object array is
    filled only from a list of already-restricted objects)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise RefusedPickle("refusing a numpy array with an unexpected pickled state")
        shape, dt, fortran, data = state[-4:]
        shape, dtype = _shape(shape), _real_dtype(dt)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != n:
                raise RefusedPickle("refusing an object array not pickled as a list")
        elif not isinstance(data, (bytes, bytearray)) or len(data) != n * dtype.itemsize:
            raise RefusedPickle("refusing a numpy array whose bytes do not match its shape")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
    if subtype is not _NdarrayName:
        raise RefusedPickle("refusing a numpy array of a subclass")
    from numpy._core.multiarray import _reconstruct as rebuild

    return rebuild(_Array, (0,), b"b")


def _scalar(dt: Any, data: Any = None) -> Any:
    dtype = _real_dtype(dt)
    if dtype.hasobject or not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise RefusedPickle(f"refusing a numpy {dtype} scalar with unexpected contents")
    return np.frombuffer(bytes(data), dtype)[0]


def _frombuffer(buf: Any, dt: Any, shape: Any, order: Any = "C") -> np.ndarray:
    dtype, shape = _real_dtype(dt), _shape(shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype.hasobject or order not in ("C", "F"):
        raise RefusedPickle("refusing an object array rebuilt from a buffer")
    raw = bytes(buf) if isinstance(buf, (bytes, bytearray, memoryview)) else None
    if raw is None or len(raw) != n * dtype.itemsize:
        raise RefusedPickle("refusing a numpy array whose bytes do not match its shape")
    return np.frombuffer(raw, dtype).reshape(shape, order=order).copy()


# numpy's rebuild names (both module spellings) -> the stand-ins above
NUMPY: dict[tuple[str, str], Any] = {
    **{
        (f"{base}.{mod}", name): fn
        for base in ("numpy.core", "numpy._core")
        for mod, name, fn in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", _scalar),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _DType,
}


class Restricted(pickle.Unpickler):
    """An Unpickler that resolves only `allowed` (module, name) -> object, plus the numpy
    stand-ins and a few harmless builtins; any other name is refused by name, before
    anything of the file is called."""

    def __init__(
        self, file: Any, allowed: dict[tuple[str, str], Any], where: str, known: str = ""
    ) -> None:
        super().__init__(file)
        self.allowed = allowed
        self.where = where
        self.known = known  # the releases whose dumps this reader knows, for the refusal

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle  # Python 2 spellings (protocol < 3: __builtin__, copy_reg)

        key = _compat_pickle.NAME_MAPPING.get((module, name))
        if key is None:
            key = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        module, name = key
        if key in self.allowed:
            return self.allowed[key]
        if key in NUMPY:
            return NUMPY[key]
        if key in _SAFE_BUILTINS:
            return super().find_class(module, name)
        known = f"; this reader knows {self.known} dumps" if self.known else ""
        raise RefusedPickle(
            f"{self.where}: refusing to load {module}.{name} from the pickle (only the "
            f"framework's batch classes, numpy arrays and tensors are read{known}; nothing "
            "from the file is run)"
        )


def _located(e: MismatchError, where: str) -> MismatchError:
    """`e` with `where` in front unless it already names it."""
    msg = str(e)
    return e if msg.startswith(where) else type(e)(f"{where}: {msg}")


def restricted_load(
    data: bytes, allowed: dict[tuple[str, str], Any], where: str, known: str = ""
) -> Any:
    """Unpickle `data` with `Restricted`; one line for anything that is not a readable,
    allowed pickle (whatever the damage: a crafted file must never reach a traceback).
    `known` (e.g. "skyrl 0.1.0-0.4.0") is named when a class is refused."""
    try:
        return Restricted(io.BytesIO(data), allowed, where, known).load()
    except MismatchError as e:
        raise _located(e, where) from None
    except Exception as e:  # damaged or crafted bytes: one line, never a crash
        raise MismatchError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- torch.save


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied. The
    view is checked to lie inside the storage (a crafted stride must not read memory beyond
    it): a ValueError otherwise."""
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], bytes)):
        raise ValueError("a tensor whose storage is not one of the archive's")
    data, dtype = storage
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"unsupported tensor storage dtype {dtype!r}")
    flat = (
        bf16_to_f32(np.frombuffer(data, np.uint16))
        if dtype == "bf16"
        else np.frombuffer(data, dtype)
    )
    offset = int(offset)
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if offset < 0 or len(stride) != len(size) or any(s < 0 for s in (*size, *stride)):
        raise ValueError(f"tensor of size {list(size)}, stride {list(stride)}, offset {offset}")
    if (
        all(size)
        and offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) >= flat.size
    ):
        raise ValueError(f"tensor of size {list(size)} reaches beyond its storage")
    if not size:
        return flat[offset : offset + 1].reshape(())
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if tuple(stride) == contiguous:
        return flat[offset : offset + int(np.prod(size))].reshape(size)
    if not all(size):
        return np.zeros(size, flat.dtype)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, tuple(s * flat.itemsize for s in stride)
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


def load_torch_zip(
    data: bytes, where: str, extra: dict[tuple[str, str], Any] | None = None, known: str = ""
) -> Any:
    """The object a `torch.save` archive holds, with tensors as numpy arrays and a
    consolidated TensorDict as {key: array}. Torch is not imported."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    except (zipfile.BadZipFile, StopIteration, ValueError, OSError) as e:
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
            if not (isinstance(pid, tuple) and len(pid) == 5):
                raise MismatchError(f"{where}: unexpected persistent id {pid!r:.60}")
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
        return _Zip(io.BytesIO(z.read(pkl)), allowed, where, known).load()
    except MismatchError as e:
        raise _located(e, where) from None
    except Exception as e:  # damaged or crafted bytes: one line, never a crash
        raise MismatchError(
            f"{where}: cannot read the torch.save archive ({type(e).__name__}: {e})"
        ) from e


def read_bytes(path: Any) -> bytes:
    """A whole file (a pickle is read in one piece; memory is bounded by one file)."""
    with open(path, "rb") as f:
        return f.read()


__all__ = [
    "NUMPY",
    "RefusedPickle",
    "Restricted",
    "as_dtype",
    "bf16_to_f32",
    "from_bytes",
    "load_torch_zip",
    "read_bytes",
    "restricted_load",
]
