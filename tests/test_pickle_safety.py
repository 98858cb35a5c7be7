"""Crafted dumps: pickles (SkyRL, verl) and `torch.save` files (slime) whose objects would
run code when loaded, at the top level and nested inside otherwise valid-looking batches
(dicts, numpy object arrays, the torch.save bytes a verl DataProto or a SkyRL entry
carries). Nothing from such a file may run, with or without --trust-pickle: the flag widens
what is READ, never what is RUN. Each refusal is one line naming the file."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.importers import pickles
from mismatch_cli.importers.ingest import ImportOptions, run_import

from . import import_fixtures as F
from .conftest import assert_one_line_error
from .conftest import cli_in_process as cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def known() -> F.Known:
    return F.known_run(num_sequences=6, max_len=8, steps=(3,))


# ----------------------------------------------------------------------------- payloads


def payloads(marker: Path) -> dict[str, Any]:
    """Objects whose unpickling would create `marker`: every way a pickle calls code."""
    cmd = f"touch {marker}"

    class OsSystem:  # pickled as posix.system (os.system's own module)
        def __reduce__(self):
            return (os.system, (cmd,))

    class Exec:
        def __reduce__(self):
            return (builtins.exec, (f"open({str(marker)!r}, 'w').close()",))

    class Eval:
        def __reduce__(self):
            return (builtins.eval, (f"__import__('os').system({cmd!r})",))

    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(marker)],))

    class ImportOs:
        def __reduce__(self):
            return (builtins.__import__, ("os",))

    class GetSystem:  # getattr(__import__("os"), "system"), then called
        def __call__(self, *a: Any) -> None: ...

        def __reduce__(self):
            return (getattr, (ImportOs(), "system"))

    class GetattrChain:
        def __reduce__(self):
            return (GetSystem(), (cmd,))

    return {"posix.system": OsSystem(), "exec": Exec(), "eval": Eval(), "Popen": Popen(),
            "getattr chain": GetattrChain()}  # fmt: skip


def raw_payloads(marker: Path) -> dict[str, bytes]:
    """Hand-written protocol-0 pickles: `os.system` by that name, a getattr chain."""
    cmd = f"touch {marker}".encode()
    return {
        "os.system": b"cos\nsystem\n(S'" + cmd + b"'\ntR.",
        "raw getattr chain": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\n"
        b"tR(S'" + cmd + b"'\ntR.",
    }


def torch_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` as bytes (the archive a verl DataProto or SkyRL entry carries)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_zip(data_pkl: bytes) -> bytes:
    """A real torch.save archive whose data.pkl is replaced by `data_pkl`."""
    src = zipfile.ZipFile(io.BytesIO(torch_bytes({"rollout_id": 3})))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            z.writestr(name, data_pkl if name.endswith("data.pkl") else src.read(name))
    return buf.getvalue()


# ----------------------------------------------------------------------------- placements
# placement -> writer(known, root, payload object, raw pickle bytes) -> the SOURCE path


def _skyrl(inject: Callable[[dict], None], layout: str = "new") -> Callable[..., Path]:
    return lambda known, root, obj, raw: F.write_skyrl(
        known, root, layout=layout, inject=lambda st: inject(st, obj)
    )[0]


def _set_enum_arg(st: dict, obj: Any) -> None:  # skyrl 0.4.0: in place of a TensorFormat
    st["batch_dict"]["rollout_logprobs"]["format"] = obj


def _set_entry(st: dict, obj: Any) -> None:
    st["batch_dict"]["rollout_logprobs"] = obj


def _set_meta(st: dict, obj: Any) -> None:
    st["metadata"]["note"] = {"nested": [1, obj]}


def _set_torch_entry(st: dict, obj: Any) -> None:  # the oldest layout: torch.save bytes
    st["batch_dict"]["rollout_logprobs"] = torch_bytes({"x": obj})


def _set_torch_fmt(st: dict, obj: Any) -> None:  # the bf16 layout: {"format": "torch"}
    st["batch_dict"]["rollout_logprobs"] = {"format": "torch", "data": torch_bytes([obj])}


def _top(name: str) -> Callable[..., Path]:
    def write(known: F.Known, root: Path, obj: Any, raw: bytes) -> Path:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(raw)
        return p

    return write


def _verl(inject: Callable[[tuple, Any], tuple]) -> Callable[..., Path]:
    return lambda known, root, obj, raw: F.write_verl(
        known, root, inject=lambda st: inject(st, obj)
    )[0]


def _slime_top(known: F.Known, root: Path, obj: Any, raw: bytes) -> Path:
    p = root / "train_data" / "3.pt"
    p.parent.mkdir(parents=True)
    p.write_bytes(torch_zip(raw))
    return p


def _slime_nested(known: F.Known, root: Path, obj: Any, raw: bytes) -> Path:
    import torch

    p = F.write_slime(known, root)[0]
    payload = torch.load(p, weights_only=True)
    payload["samples"][0]["metadata"] = {"numpy": np.int64(3), "x": [obj]}
    torch.save(payload, p)
    return p


PLACEMENTS: dict[str, tuple[str, Callable[..., Path]]] = {
    "skyrl top level": ("skyrl", _top("dumped_data/global_step_3_training_input.pkl")),
    "skyrl batch_dict entry": ("skyrl", _skyrl(_set_entry)),
    "skyrl metadata": ("skyrl", _skyrl(_set_meta)),
    "skyrl torch.save bytes": ("skyrl", _skyrl(_set_torch_entry)),
    "skyrl torch format entry": ("skyrl", _skyrl(_set_torch_fmt)),
    "skyrl 0.4.0 TensorFormat entry": ("skyrl", _skyrl(_set_enum_arg, "enum")),
    "skyrl 0.4.0 metadata": ("skyrl", _skyrl(_set_meta, "enum")),
    "skyrl_train 0.3.1 metadata": ("skyrl", _skyrl(_set_meta, "old")),
    "skyrl_train 0.3.1 torch.save entry": ("skyrl", _skyrl(_set_torch_entry, "old")),
    "verl top level": ("verl", _top("exp/GBS4_N2_in8_out32/3/gen_batch.dp")),
    "verl non_tensor_batch object array": (
        "verl",
        _verl(lambda st, o: (st[0], {**st[1], "uid": np.array([o], dtype=object)}, st[2])),
    ),
    "verl meta_info": ("verl", _verl(lambda st, o: (st[0], st[1], {"timing": [o]}))),
    "verl DataProto batch bytes": ("verl", _verl(lambda st, o: (torch_bytes({"x": o}), *st[1:]))),
    "slime top level": ("slime", _slime_top),
    "slime nested in a sample": ("slime", _slime_nested),
}


@pytest.mark.parametrize("trust", [False, True], ids=["no flag", "--trust-pickle"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_crafted_files_never_run_code(
    placement: str, trust: bool, known: F.Known, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Every payload, in every placement, with and without --trust-pickle: refused in one
    line naming the file, the marker never created, no run left behind."""
    fmt, write = PLACEMENTS[placement]
    marker = tmp_path / "MARKER"
    objs, raws = payloads(marker), raw_payloads(marker)
    cases = [(n, o, pickle.dumps(o)) for n, o in objs.items()]
    cases += [(n, next(iter(objs.values())), r) for n, r in raws.items()]
    for i, (name, obj, raw) in enumerate(cases):
        if "top level" not in placement and name in raws:
            continue  # raw bytes stand only at the top level
        src = write(known, tmp_path / f"src{i}", obj, raw)
        out = tmp_path / f"run{i}"
        opts = ImportOptions(fmt, [str(src)], out, trust_pickle=trust, model=str(tiny_model_dir))
        with pytest.raises(MismatchError) as e:
            run_import(opts)
        assert not marker.exists(), f"{placement} / {name}: code from the file ran"
        msg = str(e.value)
        assert "\n" not in msg and str(src) in msg, msg
        if trust or fmt == "slime":  # refused while reading: the name is given
            assert "refus" in msg, msg
        else:
            assert "--trust-pickle" in msg, msg
        assert not out.exists(), f"{placement} / {name}: left {out} behind"


def test_crafted_files_through_the_cli(
    known: F.Known, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same refusals as a user sees them: one line, exit 2, no traceback, no marker."""
    marker = tmp_path / "MARKER"
    obj = payloads(marker)["getattr chain"]
    raw = raw_payloads(marker)["os.system"]
    for placement in ("skyrl metadata", "verl DataProto batch bytes", "verl top level",
                      "slime nested in a sample"):  # fmt: skip
        fmt, write = PLACEMENTS[placement]
        src = write(known, tmp_path / placement.replace(" ", "_"), obj, raw)
        for flags in ([], ["--trust-pickle"]):
            out = tmp_path / "out"
            proc = cli(
                "import", fmt, str(src), *flags, "--model", str(tiny_model_dir), "--out", str(out)
            )
            assert_one_line_error(proc, str(src))
            assert proc.returncode == 2
            assert not marker.exists() and not out.exists(), placement


# ----------------------------------------------------------------------------- numpy


def _np_pointer_forgeries() -> dict[str, bytes]:
    """Pickles that real numpy would turn into forged object pointers (a segfault at best):
    `ndarray(shape, object, buffer)`, and a structured dtype with an object field whose
    pickled flags say it holds none, filled from raw bytes."""
    from numpy._core.multiarray import _reconstruct

    class Direct:
        def __reduce__(self):
            return (np.ndarray, ((2,), np.dtype("O"), b"\x41" * 16))

    class FlagsLie:
        def __reduce__(self):
            return (np.dtype, ("V8", False, True),
                    (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))  # fmt: skip

    class FromBytes:
        def __reduce__(self):
            return (
                _reconstruct,
                (np.ndarray, (0,), b"b"),
                (1, (1,), FlagsLie(), False, b"\x41" * 8),
            )

    class ObjectFromBytes:  # an object dtype whose state says flags 0, filled from bytes
        def __reduce__(self):
            return (_reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (2,), np.dtype("O"), False, b"\x41" * 16))  # fmt: skip

    return {
        "ndarray call": pickle.dumps({"x": Direct()}),
        "dtype flags": pickle.dumps([FromBytes()]),
        "object from bytes": pickle.dumps([ObjectFromBytes()]),
    }


def test_numpy_pointer_forgeries_are_refused(tmp_path: Path) -> None:
    """Read in a child process (a failure here would be a segfault, not an exception)."""
    for name, data in _np_pointer_forgeries().items():
        p = tmp_path / f"{name.replace(' ', '_')}.pkl"
        p.write_bytes(data)
        code = (
            "import sys\nfrom mismatch_cli.importers.pickles import restricted_load\n"
            "from mismatch_cli.errors import MismatchError\n"
            f"try:\n    restricted_load(open({str(p)!r}, 'rb').read(), {{}}, 'f')\n"
            "except MismatchError as e:\n    print(e); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [os.sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert proc.returncode == 3, (name, proc.returncode, proc.stderr)
        assert "refusing" in proc.stdout, (name, proc.stdout)


def test_plain_numpy_values_still_read() -> None:
    """What real dumps hold: arrays of every plain dtype (both byte orders, C and Fortran
    order), object arrays of strings, scalars, protocol-5 buffers, round-trip exactly."""
    values = {
        "f4": np.arange(6, dtype=np.float32).reshape(2, 3),
        "be": np.arange(4, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "obj": np.array(["math", None, "code"], dtype=object),
        "str": np.array(["ab", "c"]),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), np.int64),
        "scalar": np.float64(1.5),
        "int": np.int32(7),
    }
    for proto in (2, 4, 5):
        got = pickles.restricted_load(pickle.dumps(values, protocol=proto), {}, "f")
        for k, v in values.items():
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
            a, b = np.asarray(got[k]).dtype, np.asarray(v).dtype
            assert (a.kind, a.itemsize) == (b.kind, b.itemsize), k  # values: in either order


def test_tensor_views_stay_inside_their_storage() -> None:
    """A crafted size / stride / offset cannot read beyond a tensor's storage."""
    storage = (np.arange(4, dtype=np.float32).tobytes(), np.float32)
    np.testing.assert_array_equal(pickles._rebuild_tensor(storage, 1, (3,), (1,)), [1, 2, 3])
    np.testing.assert_array_equal(
        pickles._rebuild_tensor(storage, 0, (2, 2), (1, 2)), [[0, 2], [1, 3]]
    )
    for offset, size, stride in ((0, (4,), (1000,)), (3, (2,), (1,)), (-1, (2,), (1,)),
                                 (0, (2,), (-1,)), (0, (2, 2), (1,))):  # fmt: skip
        with pytest.raises(ValueError):
            pickles._rebuild_tensor(storage, offset, size, stride)
    with pytest.raises(ValueError):
        pickles._rebuild_tensor((b"\0" * 16, "O"), 0, (2,), (1,))


# ----------------------------------------------------------------------------- the words


def test_help_and_docs_say_the_flag_widens_reading_not_running() -> None:
    import re

    proc = cli("import", "--help")
    text = " ".join(proc.stdout.split())
    assert re.search(r"widens what is read, never what is run", text, re.I), text
    doc = " ".join((ROOT / "docs" / "import.md").read_text().split())
    assert "widens what is read, never what is run" in doc.lower()
