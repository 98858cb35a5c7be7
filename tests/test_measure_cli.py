"""`measure` refuses bad input with one clear line, a non-zero exit code and no traceback,
before any engine starts, and leaves no output that looks like a run. In this process
(`cli_in_process`: what the command prints and exits with), but for `--help`, whose
speed in a fresh process is what its test checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mismatch_cli.config import MeasureConfig, parse_engine_args
from mismatch_cli.errors import MismatchError

from .conftest import cli_in_process, run_cli


def _assert_clean_failure(proc, needle: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    assert needle in out, out[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature must be in [0.01, 2.0]"),
        (["--temperature", "0.001"], "--temperature must be in [0.01, 2.0]"),
        (["--engine-arg", "dtype=float32"], "is set by measure itself"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "0"], "--top-k must be -1"),
        (["--min-p", "1"], "--min-p must be in [0, 1)"),
        (["--top-logprobs", "5000"], "--top-logprobs must be in [1, 1000]"),
        (["--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1"),
        (["--infer-dtype", "fp8"], "--infer-dtype must be one of"),
        (["--engine-arg", "novalue"], "--engine-arg expects key=value"),
        (["--rescore-memory", "2XB"], "--rescore-memory expects a size like 2GiB"),
        (["--rescore-memory", "0GiB"], "--rescore-memory expects a size like 2GiB"),
    ],
)
def test_impossible_flag_values(tmp_path: Path, flags: list[str], needle: str) -> None:
    out = tmp_path / "run"
    proc = cli_in_process("measure", *flags, "--out", str(out))
    _assert_clean_failure(proc, needle)
    assert not out.exists()


def test_missing_model_path(tmp_path: Path) -> None:
    proc = cli_in_process("measure", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r"))
    _assert_clean_failure(proc, "model not found")


def test_model_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    m = tmp_path / "bert"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    proc = cli_in_process("measure", str(m), "--out", str(tmp_path / "r"))
    _assert_clean_failure(proc, "not a causal LM")


def test_folder_without_config(tmp_path: Path) -> None:
    proc = cli_in_process("measure", str(tmp_path), "--out", str(tmp_path / "r"))
    _assert_clean_failure(proc, "no config.json")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.jsonl", None, "prompt file not found"),
        ("empty.txt", "", "is empty"),
        ("broken.jsonl", "{oops\n", "cannot parse prompt file"),
        ("nocol.csv", "question\nhi\n", "has no 'prompt' or 'messages' column"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, name: str, content: str | None, needle: str) -> None:
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    out = tmp_path / "run"
    proc = cli_in_process("measure", "--prompts", str(f), "--out", str(out))
    _assert_clean_failure(proc, needle)
    assert not out.exists()


def test_unwritable_out(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = cli_in_process("measure", "--num-prompts", "1", "--out", str(blocker / "run"))
    _assert_clean_failure(proc, "cannot write to output directory")


def test_out_is_an_existing_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    proc = cli_in_process("measure", "--num-prompts", "1", "--out", str(f))
    _assert_clean_failure(proc, "exists and is a file")


def test_resume_without_a_run(tmp_path: Path) -> None:
    proc = cli_in_process("measure", "--resume", "--out", str(tmp_path / "nothing"))
    _assert_clean_failure(proc, "not a mismatch run")


def test_config_validate_accepts_defaults_and_engine_args_parse_json() -> None:
    MeasureConfig().validate()
    assert parse_engine_args(["gpu-memory-utilization=0.5", "swap_space=4", "x=abc"]) == {
        "gpu_memory_utilization": 0.5,
        "swap_space": 4,
        "x": "abc",
    }
    with pytest.raises(MismatchError):
        MeasureConfig(rescore_batch_tokens=0).validate()


def test_help_is_fast_and_names_the_conventions() -> None:
    proc = run_cli("measure", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "delta = logp_infer - logp_train" in text
    assert "SAMPLING distribution" in text
