"""The diagnose matrix without running engines: every variant's metadata, `--list` and its
JSON, what cannot run on this machine (a CPU) listed with its reason, explicit requests for
it refused in one line, and each vLLM variant's engine arguments reaching vLLM's
`EngineArgs` (constructed from the variant's kwargs; no engine starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mismatch_cli.config import MeasureConfig
from mismatch_cli.diagnose import (
    DEFAULT_VARIANTS,
    RUNS_ON,
    SIDES,
    VARIANT_NAMES,
    VARIANTS,
    parse_variants,
    variant_matrix,
)
from mismatch_cli.errors import MismatchError
from mismatch_cli.rescore_run import engine_env

from .conftest import assert_one_line_error, cli_in_process

_BY = {v.name: v for v in VARIANTS}
# The variants that need a CUDA GPU (or two, or an AVX-512 CPU): none can run on this
# machine, whose tests run on a CPU without AVX-512.
ELSEWHERE = ["train-tf32", "train-batch-invariant", "kv-fp8", "vllm-batch-invariant",
             "batch-invariant-prefill", "attn-flash-attn", "attn-flashinfer", "attn-triton",
             "attn-flex", "tp2", "fp8-weights"]  # fmt: skip


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available() and not torch.cpu._is_avx512_supported()


def test_matrix_metadata() -> None:
    assert len(VARIANTS) >= 23 and len(set(VARIANT_NAMES)) == len(VARIANTS)
    # every variant that existed keeps its name, in the default set
    assert DEFAULT_VARIANTS == ("baseline", "train-bf16", "prefill-bf16", "prefill-fp32",
                                "fp16-both", "hf-bf16-vs-fp32", "batch-shape", "attention",
                                "decode-repeat", "null")  # fmt: skip
    for v in VARIANTS:
        assert v.side in SIDES and v.runs_on in RUNS_ON, v.name
        ok, why = v.runnable()
        assert isinstance(ok, bool) and (why is None) == ok, v.name
    assert _BY["tp2"].runs_on == ">=2 GPUs"
    assert {_BY[n].runs_on for n in ("attn-flash-attn", "fp8-weights", "train-tf32")} == {"cuda"}


@pytest.mark.skipif(not _cpu_only(), reason="checks what a CPU without AVX-512 cannot run")
def test_not_runnable_here_listed_with_reason_and_refused_when_named() -> None:
    m = {r["name"]: r for r in variant_matrix()}
    for name in ELSEWHERE:
        assert m[name]["runnable"] is False and m[name]["reason"], name
        with pytest.raises(MismatchError, match=f"variant '{name}' cannot run here: "):
            parse_variants(f"null,{name}")
    assert "CUDA GPU" in m["attn-flash-attn"]["reason"]
    assert "2 CUDA GPUs" in m["tp2"]["reason"]
    assert "AVX-512" in m["kv-fp8"]["reason"]
    for name in set(m) - set(ELSEWHERE):
        assert m[name]["runnable"] is True and "reason" not in m[name], name
    # `all` selects the whole matrix; run_diagnose skips what cannot run, with the reason
    assert parse_variants("all") == list(VARIANT_NAMES)
    assert parse_variants(None) == list(DEFAULT_VARIANTS)


def test_list_json_and_table() -> None:
    proc = cli_in_process("diagnose", "--list", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == list(VARIANT_NAMES)
    for r in rows:
        assert {"name", "side", "isolates", "runs_on", "runnable"} <= set(r)
        assert ("reason" in r) == (not r["runnable"])
    proc = cli_in_process("diagnose", "--list", check=True)
    assert "The diagnose matrix" in proc.stdout
    for name in ("lm-head-fp32", "attn-flashinfer", "tp2"):
        assert name in proc.stdout


def test_bad_variant_requests_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(
        cli_in_process("diagnose", "--variants", "null,nope", "--out", str(tmp_path / "x")),
        "unknown variant 'nope'",
        "--list",
    )
    assert_one_line_error(
        cli_in_process("diagnose", "--all", "--variants", "null", "--out", str(tmp_path / "x")),
        "--all and --variants",
    )
    if _cpu_only():
        assert_one_line_error(
            cli_in_process(
                "diagnose", "--variants", "attn-flashinfer", "--out", str(tmp_path / "x")
            ),
            "cannot run here",
            "CUDA GPU",
            "runs on: cuda",
        )
        assert_one_line_error(
            cli_in_process("diagnose", "--variants", "tp2", "--out", str(tmp_path / "x")),
            "2 CUDA GPUs",
            "runs on: >=2 GPUs",
        )
    assert not (tmp_path / "x").exists()


# vLLM variants whose change is engine arguments / config fields, and what EngineArgs must hold
ENGINE_FIELDS = {
    "eager": {"enforce_eager": True},
    "max-num-seqs-1": {"max_num_seqs": 1},
    "chunked-prefill": {"enable_chunked_prefill": True, "max_num_batched_tokens": 64},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "kv-fp8": {"kv_cache_dtype": "fp8"},
    "attn-flash-attn": {"attention_backend": "FLASH_ATTN"},
    "attn-flashinfer": {"attention_backend": "FLASHINFER"},
    "attn-triton": {"attention_backend": "TRITON_ATTN"},
    "attn-flex": {"attention_backend": "FLEX_ATTENTION"},
    "decode-fp16": {"dtype": "float16"},
    "decode-fp32": {"dtype": "float32"},
    "tp2": {"tensor_parallel_size": 2},
    "fp8-weights": {"quantization": "fp8"},
}


def test_engine_arguments_reach_vllm_engine_args(tiny_model_dir: Path) -> None:
    """Each vLLM variant's change, applied to a baseline config, becomes `vllm.LLM(...)`'s
    arguments (`rollout.vllm_engine_kwargs`), which vLLM's own `EngineArgs` accepts and
    holds: the engine would start with exactly that setting."""
    from vllm.engine.arg_utils import EngineArgs

    from mismatch_cli.rollout import vllm_engine_kwargs

    base = MeasureConfig()
    base_kwargs = vllm_engine_kwargs(str(tiny_model_dir), base)
    for name, want in ENGINE_FIELDS.items():
        change = _BY[name].rescore.engine
        kwargs = vllm_engine_kwargs(str(tiny_model_dir), change.apply(base))
        ea = EngineArgs(**kwargs)
        for k, v in want.items():
            got = getattr(ea, k)
            got = getattr(got, "name", got)  # attention_backend: an AttentionBackendEnum
            assert got == v, (name, k, got)
            assert base_kwargs.get(k) != v, (name, k)  # a change, not the baseline's value
        others = {k for k in kwargs if kwargs[k] != base_kwargs.get(k)} - set(want)
        assert not others - {"max_num_seqs"}, (name, others)  # one knob (chunking: + seqs)


def test_batch_invariant_env_reaches_vllm() -> None:
    """VLLM_BATCH_INVARIANT=1 is set while the engine starts (its processes inherit it)
    and read by vLLM (`vllm.envs`), then restored."""
    import os

    import vllm.envs as venvs

    for name in ("vllm-batch-invariant", "batch-invariant-prefill"):
        change = _BY[name].rescore.engine
        assert dict(change.env) == {"VLLM_BATCH_INVARIANT": "1"}
        before = os.environ.get("VLLM_BATCH_INVARIANT")
        with engine_env(change.env):
            assert venvs.VLLM_BATCH_INVARIANT is True
        assert os.environ.get("VLLM_BATCH_INVARIANT") == before
        assert venvs.VLLM_BATCH_INVARIANT is False
