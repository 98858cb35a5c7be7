"""The tracker layer (`mismatch_cli.trackers`): a few steps written to each tracker and read
back with that tracker's own library; one-line errors for an unknown tracker, a missing
package, a missing target."""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from pathlib import Path

import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.trackers import TRACKERS, check_spec, known_trackers, open_trackers, parse_log_to

STEPS = {3: {"mismatch/k3": 1.5e-4, "mismatch/mean_abs_delta": 0.012},
         7: {"mismatch/k3": 2.5e-4, "mismatch/mean_abs_delta": 0.014},
         9: {"mismatch/k3": 9.0e-4, "mismatch/mean_abs_delta": 0.021, "mismatch/alert": 1.0}}  # fmt: skip


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'mismatch-cli[{module}]')")


def _write(spec: str) -> list:
    with open_trackers([spec], run_name="t") as ts:
        for step, m in STEPS.items():
            ts[0].log({**m, "mismatch/num_infinite": math.nan}, step)  # NaN left out
    return ts


def _check(read: dict[str, dict[int, float]]) -> None:
    """read: key -> {step: value}, as the tracker's library gives it back."""
    assert "mismatch/num_infinite" not in read
    for key in ("mismatch/k3", "mismatch/mean_abs_delta", "mismatch/alert"):
        want = {s: m[key] for s, m in STEPS.items() if key in m}
        assert read[key].keys() == want.keys(), key
        for s, v in want.items():
            assert read[key][s] == pytest.approx(v, rel=1e-6), (key, s)


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    _needs("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    _write(f"tensorboard:{tmp_path / 'tb'}")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    _check({tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]})


def test_mlflow_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    ts = _write(f"mlflow:{tmp_path / 'ml'}")
    c = MlflowClient(tracking_uri=ts[0].uri)
    run = c.get_run(ts[0].run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    _check(
        {
            k: {m.step: m.value for m in c.get_metric_history(ts[0].run_id, k)}
            for k in run.data.metrics
        }
    )
    # the default: a file store in ./mlruns
    ts = _write("mlflow")
    assert ts[0].uri == "file:./mlruns" and (tmp_path / "mlruns").is_dir()


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks, 7-byte headers:
    crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte ':W&B' header."""
    b, pos, buf, out = path.read_bytes(), 7, b"", []
    assert b[:4] == b":W&B"
    while pos + 7 <= len(b):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", b[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:  # block padding
            pos += left - 7
            continue
        buf, pos = buf + b[pos : pos + n], pos + n
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def test_wandb_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("wandb")
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ts = _write("wandb:mismatch-test")
    assert ts[0].dir.name.startswith("offline-run-")  # offline: nothing went to the network
    (wandb_file,) = ts[0].dir.glob("run-*.wandb")
    read: dict[str, dict[int, float]] = {}
    for data in _wandb_records(wandb_file):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item
            }
            for k, v in row.items():
                if not k.startswith("_"):
                    read.setdefault(k, {})[row["_step"]] = v
    _check(read)


def test_trackio_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs("trackio")
    if "trackio" in sys.modules:  # TRACKIO_DIR is read when trackio is imported
        pytest.skip("trackio was imported before this test set TRACKIO_DIR")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    _write("trackio:mismatch-test")
    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / "mismatch-test.db").is_file()
    rows = SQLiteStorage.get_logs("mismatch-test", "t")
    keys = {k for r in rows for k in r if k.startswith("mismatch/")}
    _check({k: {r["step"]: r[k] for r in rows if k in r} for k in keys})


def test_unknown_tracker_lists_the_known_ones() -> None:
    with pytest.raises(MismatchError) as e:
        parse_log_to(["neptune:proj"])
    msg = str(e.value)
    assert "\n" not in msg and "unknown tracker 'neptune'" in msg
    for kind in TRACKERS:
        assert kind in msg
    assert known_trackers() in msg


def test_missing_target_says_what_to_give() -> None:
    with pytest.raises(
        MismatchError, match=r"--log-to tensorboard needs a target: --log-to tensorboard:DIR"
    ):
        check_spec("tensorboard")


@pytest.mark.parametrize("kind", list(TRACKERS))
def test_missing_package_names_the_extra(
    kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    top = TRACKERS[kind].MODULE.split(".")[0]
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)  # import raises ImportError
    with pytest.raises(MismatchError) as e:
        parse_log_to([f"tensorboard:{tmp_path}", f"{kind}:x"])
    msg = str(e.value)
    assert "\n" not in msg and f"pip install 'mismatch-cli[{kind}]'" in msg
    assert not (tmp_path / "events").exists() and list(tmp_path.iterdir()) == []  # none opened


def test_a_target_the_library_refuses_is_one_line(tmp_path: Path) -> None:
    _needs("tensorboard")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(MismatchError, match=r"^--log-to tensorboard:.*cannot open it"):
        parse_log_to([f"tensorboard:{f}"])
