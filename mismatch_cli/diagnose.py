"""`mismatch diagnose`: which knob causes the training-inference mismatch.

One generation (the `baseline` run: vLLM bf16 decode against transformers fp32, eager), then
a preset matrix of variants on the same tokens, each a run directory built from the baseline
by `rescore_run.rescore_run` (one side re-scored with one setting changed) or
`rescore_run.decode_repeat` (vLLM decoding the same prompts again with the same seeds). Every
difference between two rows is therefore caused by the one knob the row names, never by
other tokens. The ranking and the verdict (largest single source, the engine floor at
equal dtype, the share of bf16) come from the variants' headline numbers (`compare`).

Which SIDE: every variant's two sides are also measured against a precise reference on the
same tokens (`attribution`): DIR/reference/ is the baseline re-scored by transformers float32,
eager attention, one sequence per pass (and DIR/reference-fp64/, `--reference-fp64 N`, its
first N sequences in float64, to show the float32 reference's own error).

Layout of a diagnose directory (docs/formats.md):
    DIR/variants/<name>/   a complete run per variant that ran
    DIR/reference/         the precise reference (DIR/reference-fp64/: its float64 check)
    DIR/diagnose.json      the result (what `--json` prints)
    DIR/figures/           diagnose.png (`plots.diagnose`)
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import MeasureConfig
from .errors import MismatchError, first_line
from .measurement import run_measure
from .pipeline import Progress
from .rescore_run import (
    DECODE_REPEAT,
    VLLM_DECODE,
    EngineChange,
    RescoreOptions,
    decode_repeat,
    rescore_run,
)
from .results import json_ready
from .runs import RunDir, RunMeta
from .schema import DIAGNOSE_JSON

VARIANTS_DIR = "variants"
BASELINE = "baseline"
NULL = "null"
REFERENCE = "reference"
REFERENCE_FP64 = "reference-fp64"
# The precise reference each side is measured against: the baseline's tokens re-scored by
# transformers float32, eager attention, one sequence per pass (no batch padding at all).
REFERENCE_OPTIONS = RescoreOptions(
    train_dtype="float32", attn_implementation="eager", rescore_batch_tokens=1
)
REFERENCE_WHAT = "transformers float32, eager attention, one sequence per pass"
# The attribution keys each variant row gains (nats; `attribution.side_errors`).
ATTRIBUTION_KEYS = ("err_infer_rms", "err_train_rms", "err_corr", "gap_rms", "gap_predicted_rms")


# Where a variant can run (`Variant.runs_on`): anywhere (a CPU is enough), a CUDA GPU, two.
CPU, CUDA, TWO_GPUS = "cpu", "cuda", ">=2 GPUs"
RUNS_ON = (CPU, CUDA, TWO_GPUS)
# Which side a variant changes against the baseline (`Variant.side`).
SIDES = ("inference", "training", "both", "check")


@dataclass(frozen=True)
class Variant:
    """One row of the matrix: what it isolates, its two sides (short descriptions), its role
    (`reference`, `setting` a user could adopt, `source` of mismatch it measures alone,
    `check`), and how it is built from the baseline (`rescore` options; None for the
    baseline itself and for decode-repeat).

    `side`: which side it changes (`SIDES`); `runs_on`: where it can run (`RUNS_ON`);
    `needs`: a check of this machine and this vLLM build beyond `runs_on` (a library
    importable, a CPU feature), returning why not or None; `default`: in the set `diagnose`
    runs without --variants / --all (the default set fits 15 minutes on a 2-core CPU);
    `against`: the variant whose k3 it is read against (the same setting without its one
    change; `baseline` means the baseline's k3 on the variant's own tokens)."""

    name: str
    isolates: str
    inference: str
    training: str
    role: str
    rescore: RescoreOptions | None = None
    side: str = "both"
    runs_on: str = CPU
    needs: Callable[[], str | None] | None = None
    default: bool = True
    against: str | None = None  # the row it is read against (its `k3_vs_against` ratio)

    def runnable(self) -> tuple[bool, str | None]:
        """(True, None) if this variant can run on this machine with this vLLM build, else
        (False, why: one line, with where it can run)."""
        why = _where_reason(self.runs_on) or (self.needs() if self.needs else None)
        return why is None, why


def _where_reason(runs_on: str) -> str | None:
    """Why this machine is not a `runs_on` machine (None if it is)."""
    if runs_on == CPU:
        return None
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = 2 if runs_on == TWO_GPUS else 1
    if n >= want:
        return None
    have = "no CUDA GPU" if n == 0 else f"{n} CUDA GPU"
    return f"needs {'2 CUDA GPUs' if want == 2 else 'a CUDA GPU'} ({have} here)"


def _module(name: str, what: str) -> Callable[[], str | None]:
    """A `Variant.needs` check: `name` importable."""

    def check() -> str | None:
        import importlib.util

        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"needs {what} (`import {name}` fails here)"

    return check


def _engine_arg(name: str) -> Callable[[], str | None]:
    """A `Variant.needs` check: this vLLM's `EngineArgs` has the field `name`."""

    def check() -> str | None:
        return (
            None
            if name in _engine_arg_names()
            else (f"this vLLM ({_vllm_version()}) has no engine argument {name}")
        )

    return check


def _all(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    """A `Variant.needs` check: the first of `checks` that fails."""

    def check() -> str | None:
        return next((w for c in checks if (w := c()) is not None), None)

    return check


def _fp8_kv_cache() -> str | None:
    """vLLM's CPU attention stores an fp8 KV cache only with AVX-512 or AMX
    (v1/attention/backends/cpu_attn.py `_get_attn_isa`); on CUDA it always can."""
    import torch

    if torch.cuda.is_available():
        return None
    cpu = torch.cpu
    if cpu._is_avx512_supported() or cpu._is_amx_tile_supported():
        return None
    return "vLLM's CPU build keeps an fp8 KV cache only on x86 with AVX-512 or AMX (neither here)"


@functools.cache
def _engine_arg_names() -> frozenset[str]:
    """The fields of this vLLM's `EngineArgs`, read from its source (vllm/engine/
    arg_utils.py: `    name: type = ...` lines of the dataclass) rather than imported:
    importing vLLM takes most of a minute on a small CPU, and `--list` starts nothing."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    src = Path(next(iter(spec.submodule_search_locations)), "engine", "arg_utils.py")
    text = src.read_text() if src.is_file() else ""
    body = text.split("class EngineArgs", 1)[-1].split("\nclass ", 1)[0]
    return frozenset(re.findall(r"^    ([a-z_][a-z0-9_]*): ", body, flags=re.M))


def _vllm_version() -> str:
    from importlib.metadata import version

    return f"vLLM {version('vllm')}"


def _decode(**change: Any) -> RescoreOptions:
    """Rescore options of an inference-side variant that decodes the baseline's prompts
    again with vLLM, one engine setting changed (`config` fields by name, the rest engine
    arguments; `env` a dict of environment variables)."""
    env = change.pop("env", {})
    cfg = {k: change.pop(k) for k in list(change) if k in _CONFIG_FIELDS}
    return RescoreOptions(infer_side=VLLM_DECODE, engine=EngineChange(cfg, change, env))


def _prefill(dtype: str = "bfloat16", **change: Any) -> RescoreOptions:
    """Rescore options of an inference-side variant that scores the baseline's tokens with
    one vLLM prefill pass, one engine setting changed (as `_decode`)."""
    env = change.pop("env", {})
    cfg = {k: change.pop(k) for k in list(change) if k in _CONFIG_FIELDS}
    return RescoreOptions(
        infer_side="vllm-prefill", infer_dtype=dtype, engine=EngineChange(cfg, change, env)
    )


# MeasureConfig fields an engine change may set (the rest are vLLM engine arguments).
_CONFIG_FIELDS = ("infer_dtype", "enforce_eager", "kv_cache_dtype", "tensor_parallel_size")
# A chunked prefill's token budget: a 128-token completion's prompt + response (~200 tokens
# with the chat template) is split in about four chunks.
CHUNK_TOKENS = 64
# The attention backends of vLLM 0.32 (v1/attention/backends/registry.py
# `AttentionBackendEnum`); its CPU build has only CPU_ATTN and ignores any other choice
# ("Cannot use ... backend on CPU"), so each is a CUDA variant.
ATTENTION_BACKENDS = {
    "FLASH_ATTN": ("attn-flash-attn", _module("vllm.vllm_flash_attn", "vLLM's flash-attn build")),
    "FLASHINFER": ("attn-flashinfer", _module("flashinfer", "the flashinfer library")),
    "TRITON_ATTN": ("attn-triton", _module("triton", "Triton")),
    "FLEX_ATTENTION": ("attn-flex", None),
}
_BI_VLLM = (
    "vLLM's batch-invariant kernels are Triton GPU kernels "
    "(model_executor/determinism/batch_invariant.py)"
)

_FP32, _BF16 = "float32", "bfloat16"
_TRAIN_FP32 = "transformers fp32, eager"
_DEC = "vLLM decode, bf16"
VARIANTS: tuple[Variant, ...] = (
    # --- the default set: the matrix `diagnose` has always run (names and meanings kept)
    Variant(BASELINE, "what an RL run sees", _DEC, _TRAIN_FP32, "reference", side="both"),
    Variant("train-bf16", "the usual FSDP bf16 trainer", _DEC,
            "transformers bf16, eager", "setting", RescoreOptions(train_dtype=_BF16),
            side="training"),
    Variant("prefill-bf16", "decode path vs prefill path", "vLLM prefill, bf16",
            _TRAIN_FP32, "setting",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype=_BF16), side="inference"),
    Variant("prefill-fp32", "the engine floor at equal dtype", "vLLM prefill, fp32",
            _TRAIN_FP32, "source",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype=_FP32), side="inference"),
    Variant("fp16-both", "the FP16 recipe", "vLLM prefill, fp16", "transformers fp16, eager",
            "setting",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype="float16",
                           train_dtype="float16"), side="both"),
    Variant("hf-bf16-vs-fp32", "dtype alone, no engine", "transformers bf16, eager",
            _TRAIN_FP32, "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16), side="inference"),
    Variant("batch-shape", "trainer batch invariance", "transformers bf16, batched",
            "transformers bf16, one sequence per pass", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16, train_dtype=_BF16,
                           rescore_batch_tokens=1), side="training"),
    Variant("attention", "attention kernel", "transformers fp32, eager",
            "transformers fp32, sdpa", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_FP32,
                           attn_implementation="sdpa"), side="training"),
    Variant(DECODE_REPEAT, "the engine's own run-to-run noise",
            "vLLM decode, bf16, run again with the same seeds", "the first decode's logp_infer",
            "source", side="inference"),
    Variant(NULL, "must be exactly 0", "transformers fp32 prefill", "the same call", "check",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_FP32), side="check"),
    # --- training side (opt-in: --all or --variants)
    Variant("lm-head-fp32", "an fp32 LM head + final norm on a bf16 trainer (TRL "
            "cast_lm_head_to_fp32)", _DEC, "transformers bf16, LM head + final norm fp32",
            "setting", RescoreOptions(train_dtype=_BF16, lm_head_fp32=True),
            side="training", against="train-bf16", default=False),
    Variant("logsoftmax-bf16", "log-softmax in the logits' bf16 instead of fp32", _DEC,
            "transformers bf16, log-softmax in bf16", "source",
            RescoreOptions(train_dtype=_BF16, logsoftmax_dtype=_BF16),
            side="training", against="train-bf16", default=False),
    Variant("train-tf32", "TF32 matmuls on an fp32 trainer", _DEC,
            "transformers fp32, TF32 matmuls", "setting", RescoreOptions(tf32=True),
            side="training", runs_on=CUDA, against="baseline", default=False),
    Variant("train-batch-invariant", "batch-invariant kernels on a bf16 trainer", _DEC,
            "transformers bf16, batch_invariant_ops kernels", "setting",
            RescoreOptions(train_dtype=_BF16, batch_invariant=True), side="training",
            runs_on=CUDA, against="train-bf16", default=False,
            needs=_module("batch_invariant_ops", "the batch_invariant_ops library "
                          "(thinking-machines-lab/batch_invariant_ops)")),
    Variant("packed", "packed rows (position ids restarting) vs one sequence per row",
            "transformers bf16, one sequence per row", "transformers bf16, packed rows",
            "source", RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16,
                                     train_dtype=_BF16, layout="packed"),
            side="training", default=False),
    Variant("padding-left", "left vs right padding", "transformers bf16, right padded",
            "transformers bf16, left padded", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16, train_dtype=_BF16,
                           layout="left"), side="training", default=False),
    # --- inference side: vLLM engine arguments and modes (opt-in)
    Variant("eager", "no CUDA graphs / torch.compile (enforce_eager)",
            "vLLM decode, bf16, enforce_eager", _TRAIN_FP32, "setting",
            _decode(enforce_eager=True), side="inference", against="baseline", default=False),
    Variant("max-num-seqs-1", "one sequence per engine step (max_num_seqs=1)",
            "vLLM decode, bf16, max_num_seqs=1", _TRAIN_FP32, "source",
            _decode(max_num_seqs=1), side="inference", against="baseline", default=False,
            needs=_engine_arg("max_num_seqs")),
    Variant("chunked-prefill", f"a prefill chunked by a {CHUNK_TOKENS}-token budget",
            f"vLLM prefill, bf16, chunks of {CHUNK_TOKENS} tokens", _TRAIN_FP32, "source",
            _prefill(enable_chunked_prefill=True, max_num_batched_tokens=CHUNK_TOKENS,
                     max_num_seqs=CHUNK_TOKENS),
            side="inference", against="prefill-bf16", default=False, needs=_engine_arg("enable_chunked_prefill")),
    Variant("no-prefix-cache", "prefix caching off (the samples of a prompt share it)",
            "vLLM decode, bf16, enable_prefix_caching=False", _TRAIN_FP32, "source",
            _decode(enable_prefix_caching=False), side="inference", against="baseline", default=False,
            needs=_engine_arg("enable_prefix_caching")),
    Variant("kv-fp8", "an fp8 KV cache", "vLLM decode, bf16, kv_cache_dtype fp8",
            _TRAIN_FP32, "setting", _decode(kv_cache_dtype="fp8"), side="inference",
            against="baseline", default=False, needs=_fp8_kv_cache),
    Variant("vllm-batch-invariant", "vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1)",
            "vLLM decode, bf16, VLLM_BATCH_INVARIANT=1", _TRAIN_FP32, "setting",
            _decode(env={"VLLM_BATCH_INVARIANT": "1"}), side="inference", runs_on=CUDA,
            against="baseline", default=False, needs=_module("triton", "Triton (" + _BI_VLLM + ")")),
    Variant("batch-invariant-prefill", "prefill in vLLM's batch-invariant mode (beside "
            "vllm-batch-invariant: prefill == decode)",
            "vLLM prefill, bf16, VLLM_BATCH_INVARIANT=1", _TRAIN_FP32, "source",
            _prefill(env={"VLLM_BATCH_INVARIANT": "1"}), side="inference", runs_on=CUDA,
            against="prefill-bf16", default=False, needs=_module("triton", "Triton (" + _BI_VLLM + ")")),
    *(
        Variant(name, f"the {backend} attention backend", f"vLLM decode, bf16, {backend}",
                _TRAIN_FP32, "source", _decode(attention_backend=backend), side="inference",
                runs_on=CUDA, default=False, against=BASELINE,
                needs=_all(_engine_arg("attention_backend"), *([check] if check else [])))
        for backend, (name, check) in ATTENTION_BACKENDS.items()
    ),
    Variant("decode-fp16", "an fp16 engine against the fp32 trainer",
            "vLLM decode, fp16", _TRAIN_FP32, "setting", _decode(infer_dtype="float16"),
            side="inference", against="baseline", default=False),
    Variant("decode-fp32", "an fp32 engine against the fp32 trainer (decode path)",
            "vLLM decode, fp32", _TRAIN_FP32, "source", _decode(infer_dtype=_FP32),
            side="inference", against="baseline", default=False),
    Variant("tp2", "tensor parallel 2 (sharded matmuls, all-reduce)",
            "vLLM decode, bf16, tensor_parallel_size=2", _TRAIN_FP32, "setting",
            _decode(tensor_parallel_size=2), side="inference", runs_on=TWO_GPUS,
            against="baseline", default=False),
    Variant("fp8-weights", "FP8-quantized weights of the same checkpoint",
            "vLLM decode, bf16 activations, fp8 weights (quantization=fp8)", _TRAIN_FP32,
            "setting", _decode(quantization="fp8"), side="inference", runs_on=CUDA,
            against="baseline", default=False, needs=_engine_arg("quantization")),
)  # fmt: skip
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)
_BY_NAME = {v.name: v for v in VARIANTS}

# The candidate sources of the BASELINE's mismatch the verdict ranks: variant (or
# "decode-path", measured between the baseline and prefill-bf16) -> what it is, in words.
# (batch-shape is a bf16 trainer's property: the fp32 baseline trainer is batch invariant
# to ~3e-5 nats, so the verdict reports it beside train-bf16, not as a baseline source.)
SOURCES: dict[str, str] = {
    "hf-bf16-vs-fp32": "bf16 instead of fp32 (transformers on both sides, no engine)",
    "prefill-fp32": "the engine itself at equal dtype (vLLM fp32 prefill vs transformers fp32)",
    "decode-path": "vLLM's decode path over its own prefill path (bf16; baseline k3 minus "
    "prefill-bf16's)",
    "attention": "the attention kernel (eager vs sdpa, fp32)",
    DECODE_REPEAT: "vLLM's run-to-run noise (same seeds, sequences that came out identical)",
}
# The headline numbers of each variant (`compare.run_summary` keys), in the --json.
VARIANT_KEYS = (
    "num_tokens",
    "num_infinite",
    "mean_abs_delta",
    "k3",
    "p99_abs_delta",
    "max_abs_delta",
    "tv_coarse_mean",
    "kl_qp_coarse_mean",
    "kl_pq_coarse_mean",
)


DEFAULT_VARIANTS: tuple[str, ...] = tuple(v.name for v in VARIANTS if v.default)


def parse_variants(spec: str | Sequence[str] | None) -> list[str]:
    """Variant names from '--variants a,b', in matrix order; the baseline is always included
    (every other variant is built from it). None: the default set (`DEFAULT_VARIANTS`);
    'all': every variant of the matrix (those that cannot run here are then skipped with
    their reason). A variant named explicitly that cannot run here is a one-line error
    saying why and where it can run."""
    if spec is None:
        return list(DEFAULT_VARIANTS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s.strip()]
    if not names:
        raise MismatchError(
            f"--variants {spec!r} names no variant; choose from all, {', '.join(VARIANT_NAMES)}"
        )
    if names == ["all"]:
        return list(VARIANT_NAMES)
    if "all" in names:
        raise MismatchError("--variants all stands alone: it already names every variant")
    bad = [n for n in names if n not in _BY_NAME]
    if bad:
        raise MismatchError(
            f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANT_NAMES)} "
            "(`mismatch diagnose --list` shows the matrix)"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MismatchError(f"--variants names {', '.join(twice)} twice: name each once")
    for n in names:
        ok, why = _BY_NAME[n].runnable()
        if not ok:
            where = _BY_NAME[n].runs_on  # a CPU variant's reason says which CPU it needs
            raise MismatchError(
                f"variant {n!r} cannot run here: {why}"
                + (f"; it runs on: {where}" if where != CPU else "")
            )
    return [n for n in VARIANT_NAMES if n in names or n == BASELINE]


def variant_matrix() -> list[dict[str, Any]]:
    """The whole matrix as data (`diagnose --list --json`): per variant `name`, `side`,
    `isolates`, `runs_on`, `runnable` (here, with this vLLM build), `reason` (only when not
    runnable), and `default` (in the set run without --variants / --all)."""
    out = []
    for v in VARIANTS:
        ok, why = v.runnable()
        row: dict[str, Any] = {"name": v.name, "side": v.side, "isolates": v.isolates,
                               "runs_on": v.runs_on, "runnable": ok}  # fmt: skip
        if not ok:
            row["reason"] = why
        row["default"] = v.default
        row["inference"], row["training"] = v.inference, v.training
        out.append(row)
    return out


def check_baseline_run(meta: RunMeta, path: Path) -> None:
    """`--run RUN` must be what the baseline row says: vLLM bf16 decode, transformers fp32
    eager (the variants' descriptions assume it)."""
    cfg = meta.config
    want = {
        "infer_engine": "vllm",
        "infer_dtype": _BF16,
        "train_dtype": _FP32,
        "attn_implementation": "eager",
    }
    off = [f"{k} {cfg.get(k)}" for k, v in want.items() if cfg.get(k) != v]
    if off or meta.command != "measure":
        raise MismatchError(
            f"--run {path} is not a baseline (a `measure` run, vLLM bf16 decode vs "
            f"transformers fp32 eager): {', '.join(off) or 'command ' + meta.command}"
        )


def run_diagnose(
    cfg: MeasureConfig,
    out: Path,
    variants: Sequence[str] | str | None = None,
    *,
    run: Path | None = None,
    model: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    reference: bool = True,
    reference_fp64: int = 0,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Generate once (or take `run`), build the precise reference (unless `reference` is
    False; `reference_fp64` > 0: also its float64 check on that many sequences) and the
    variants, and return the result dict (also written to DIR/diagnose.json); the figure is
    drawn by the caller (`draw_diagnose`).
    With `run`, `model` (if given) is where RUN's model is now (its folder moved).

    `run` is checked before anything is written: complete, a baseline, its model folder
    there (or `model`, hashed against RUN's weights), its token table readable to the end.
    A variant that cannot be built here (a dtype the CPU build refuses, a run sampled at
    temperature != 1 for the vLLM prefill rows, no identical sequence for decode-repeat) is
    skipped with its one-line reason, reported through `progress.log` and in `skipped`.
    `cfg.data_parallel` > 1 generates the baseline on that many vLLM engines (Ray actors at
    `ray_address`, `measurement.run_measure`); the variants that decode again use one."""
    from .compare import run_summary
    from .rescore_run import _weights_check, run_model_path
    from .runs import check_out, open_run, replacing

    prog = progress or Progress()
    names = parse_variants(variants)
    cfg.validate()
    if reference_fp64 < 0:
        raise MismatchError(f"--reference-fp64 must be >= 0, got {reference_fp64}")
    if reference_fp64 and not reference:
        raise MismatchError("--reference-fp64 checks the reference: it needs --reference")
    moved: str | None = None
    if run is not None:
        _, meta = open_run(run, allow_incomplete=False)
        check_baseline_run(meta, run)
        where = run_model_path(meta, run, model, how="pass it as MODEL (diagnose PATH --run RUN)")
        _weights_check(where, meta, moved=model is not None)
        moved = where if model is not None else None
        run_summary(run, BASELINE)  # a table damaged past its footer fails here, in one line
    target: dict[str, Any] = {
        "overwrite": overwrite,
        "inputs": [("the --run baseline", Path(run))] if run is not None else [],
        "marker": DIAGNOSE_JSON,
        "kind": "diagnose directory",
    }
    check_out(out, **target)
    with replacing(out, **target) as work:  # built beside `out`, renamed when complete
        vdir = work / VARIANTS_DIR
        base = vdir / BASELINE
        t0 = time.perf_counter()
        if run is not None:
            shutil.copytree(run, base, ignore=shutil.ignore_patterns("parts", "figures"))
            if moved is not None:  # the variants load the model from where it is now
                b = RunDir(base)
                m = b.read_meta()
                m["model"] = {**m.model, "path": moved}
                m["config"] = {**m.config, "model": moved}
                b.write_meta(m)
        else:
            prog.log(f"diagnose: generating the baseline into {out / VARIANTS_DIR / BASELINE}")
            run_measure(cfg, base, progress=prog, ray_address=ray_address)
        seconds = {BASELINE: time.perf_counter() - t0}
        skipped: dict[str, str] = {}
        refs = _build_references(base, work, out, reference, reference_fp64, seconds, skipped, prog)
        for name in names[1:]:
            v = _BY_NAME[name]
            path = vdir / name
            ok, why = v.runnable()
            if not ok:  # listed as skipped with its reason, never silently
                skipped[name] = f"cannot run here: {why}"
                prog.log(f"diagnose: skipped {name}: {skipped[name]}")
                continue
            prog.log(f"diagnose: {name} ({v.isolates}): {v.inference} vs {v.training}")
            t0 = time.perf_counter()
            try:
                if name == DECODE_REPEAT:
                    decode_repeat(base, path, progress=prog)
                else:
                    rescore_run(base, path, v.rescore, progress=prog)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                skipped[name] = _why(e, work, out)
                shutil.rmtree(path, ignore_errors=True)
                prog.log(f"diagnose: skipped {name}: {skipped[name]}")
            seconds[name] = time.perf_counter() - t0
        _relocate(work, out, [vdir / n for n in names] + [work / r for r in refs])
        result = summarize(work, names, skipped, seconds, at=out, references=refs)
        (work / DIAGNOSE_JSON).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _why(e: BaseException, work: Path, out: Path) -> str:
    """One line for a variant (or reference) that could not be built, naming `out`'s paths."""
    why = first_line(e) if isinstance(e, MismatchError) else f"{type(e).__name__}: {first_line(e)}"
    return why.replace(str(work), str(out))


def _build_references(
    base: Path,
    work: Path,
    out: Path,
    reference: bool,
    fp64: int,
    seconds: dict[str, float],
    skipped: dict[str, str],
    prog: Progress,
) -> list[str]:
    """Build DIR/reference (and DIR/reference-fp64 with `fp64` sequences) from the baseline;
    return the names built. One that fails is recorded in `skipped` with its reason (the
    attribution is then absent), never fatal."""
    todo = [(REFERENCE, REFERENCE_OPTIONS)] if reference else []
    if fp64:
        opts = replace(REFERENCE_OPTIONS, train_dtype="float64", sequences=fp64)
        todo.append((REFERENCE_FP64, opts))
    built = []
    for name, opts in todo:
        prog.log(
            f"diagnose: {name} ({REFERENCE_WHAT}{', float64' if name == REFERENCE_FP64 else ''})"
        )
        t0 = time.perf_counter()
        try:
            rescore_run(base, work / name, opts, progress=prog)
            built.append(name)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            skipped[name] = _why(e, work, out)
            shutil.rmtree(work / name, ignore_errors=True)
            prog.log(f"diagnose: no {name}: {skipped[name]}")
            if name == REFERENCE:
                break  # the float64 check is of the reference: nothing to check
        seconds[name] = time.perf_counter() - t0
    return built


def _relocate(work: Path, out: Path, paths: Sequence[Path]) -> None:
    """The paths the runs in `work` record of each other (`rescored_from.run`,
    `decode_repeat.run`: the baseline) as they will be once `work` is renamed to `out`."""
    for path in paths:
        run = RunDir(path)
        if not run.exists():
            continue
        meta = run.read_meta()
        for key in ("rescored_from", "decode_repeat"):
            block = meta.get(key)
            if isinstance(block, dict) and str(block.get("run", "")).startswith(str(work)):
                block["run"] = str(out) + str(block["run"])[len(str(work)) :]
        run.write_meta(meta)


def summarize(
    out: Path,
    names: Sequence[str],
    skipped: dict[str, str],
    seconds: dict[str, float],
    at: Path | None = None,
    references: Sequence[str] = (),
) -> dict[str, Any]:
    """The diagnose result from the variant runs on disk in `out`: one row per variant
    (matrix order), the ranking by k3, the sources, the attribution of each variant's gap
    to its two sides against `references` (DIR/reference, DIR/reference-fp64, those built)
    and the verdict (a strict-JSON dict).
    `at`: where the directory will be (the paths the result records; default `out`)."""
    from .attribution import attribution_row, side_errors
    from .compare import moved, run_summary

    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    for name in names:
        v = _BY_NAME[name]
        path = out / VARIANTS_DIR / name
        row: dict[str, Any] = {
            "name": name,
            "isolates": v.isolates,
            "inference": v.inference,
            "training": v.training,
            "role": v.role,
            "side": v.side,
            "runs_on": v.runs_on,
            "run": None if name in skipped else str((at or out) / VARIANTS_DIR / name),
            "skipped": skipped.get(name),
            "seconds": round(seconds.get(name, math.nan), 1),
            **{k: None for k in VARIANT_KEYS},
            **{k: None for k in ATTRIBUTION_KEYS},
        }
        if v.against is not None:
            row["against"] = v.against
            row["k3_vs_against"] = None
        if name not in skipped:
            s = run_summary(path, name)
            summaries[name] = s
            row.update({k: s.get(k) for k in VARIANT_KEYS})
            if name == DECODE_REPEAT:
                from .runs import read_tokens

                dr = RunDir(path).read_meta().get("decode_repeat") or {}
                row["num_sequences"] = dr.get("num_sequences")
                row["num_identical_sequences"] = dr.get("num_identical")
                row["num_tokens_moved"] = int((read_tokens(path, ["delta"])["delta"] != 0).sum())
                row["note"] = (
                    f"{dr.get('num_identical')} of {dr.get('num_sequences')} sequences came out "
                    f"identical; compared over those ({row['num_tokens_moved']:,} of "
                    f"{row['num_tokens']:,} tokens moved)"
                )
            again = (RunDir(path).read_meta().get("rescored_from") or {}).get("decoded_again")
            if again:  # decoded again with one engine setting changed: the identical ones
                row["num_sequences"] = again.get("num_sequences")
                row["num_identical_sequences"] = again.get("num_identical")
                row["baseline_k3_same_tokens"] = _baseline_k3_on(out, path)
                row["note"] = (
                    f"{again.get('num_identical')} of {again.get('num_sequences')} sequences "
                    "came out identical when decoded again; compared over those (the "
                    f"baseline's k3 on the same tokens: {row['baseline_k3_same_tokens']:.3g})"
                )
        rows.append(row)
    k3 = {r["name"]: r["k3"] for r in rows if r["k3"] is not None}
    for r in rows:  # each opt-in row against the row without its one change
        if r.get("against") and r["k3"] is not None:
            same = r["against"] == BASELINE and "baseline_k3_same_tokens" in r
            ref = r["baseline_k3_same_tokens"] if same else k3.get(r["against"])
            r["k3_vs_against"] = r["k3"] / ref if ref else None
    ranking = sorted(k3, key=lambda n: -k3[n])
    sources = []
    decode_vs_prefill = None
    for key, what in SOURCES.items():
        if key == "decode-path":
            if BASELINE in k3 and "prefill-bf16" in k3:
                # what the decode path adds: both rows score the same tokens against the same
                # fp32 trainer, the baseline with decode log-probs, prefill-bf16 with prefill
                sources.append({"source": key, "what": what,
                                "k3": k3[BASELINE] - k3["prefill-bf16"],
                                "mean_abs_delta": None})  # fmt: skip
                # and how far the two bf16 inference sides are from each other, token by token
                # (b = the baseline: decode log-probs in the inference role)
                mv = moved(out / VARIANTS_DIR / "prefill-bf16", out / VARIANTS_DIR / BASELINE)
                if mv["shared"]:
                    decode_vs_prefill = {"k3": mv["infer"]["k3"],
                                         "mean_abs_delta": mv["infer"]["mean_abs"],
                                         "max_abs_delta": mv["infer"]["max_abs"]}  # fmt: skip
            continue
        if key in k3:
            sources.append({"source": key, "what": what, "k3": k3[key],
                            "mean_abs_delta": summaries[key]["mean_abs_delta"]})  # fmt: skip
    b = k3.get(BASELINE)
    for s in sources:
        s["share_of_baseline_k3"] = s["k3"] / b if b and s["k3"] is not None else None
    sources.sort(key=lambda s: -(s["k3"] if s["k3"] is not None else -1))
    attribution = None
    ref_block: dict[str, Any] = {"what": REFERENCE_WHAT, "run": None,
                                 "skipped": skipped.get(REFERENCE), "fp64": None}  # fmt: skip
    if REFERENCE in references:
        ref = out / REFERENCE
        ref_block["run"] = str((at or out) / REFERENCE)
        ref_block["seconds"] = round(seconds.get(REFERENCE, math.nan), 1)
        attribution = []
        for r in rows:
            if r["skipped"]:
                continue
            a = attribution_row(r["name"], side_errors(ref, out / VARIANTS_DIR / r["name"]))
            attribution.append(a)
            if a["shared"]:
                r.update({k: a[k] for k in ATTRIBUTION_KEYS})
        if REFERENCE_FP64 in references:
            # the float32 reference against float64 on the same tokens: its own error
            e = side_errors(out / REFERENCE_FP64, ref)
            ref_block["fp64"] = {
                "run": str((at or out) / REFERENCE_FP64),
                "num_sequences": RunDir(out / REFERENCE_FP64)
                .read_meta()["summary"]
                .get("num_sequences"),
                "num_tokens": e.get("num_tokens"),
                "err_rms": (e.get("train") or {}).get("rms"),
                "err_p99": (e.get("train") or {}).get("p99_abs"),
            }
        elif REFERENCE_FP64 in skipped:
            ref_block["fp64"] = {"skipped": skipped[REFERENCE_FP64]}
    result = {
        "out": str(at or out),
        "variants": rows,
        "ranking": ranking,
        "sources": sources,
        "decode_vs_prefill": decode_vs_prefill,
        "reference": ref_block,
        "attribution": attribution,
        "not_runnable": [
            {"name": m["name"], "runs_on": m["runs_on"], "reason": m["reason"]}
            for m in variant_matrix()
            if not m["runnable"]
        ],
    }
    bi = [out / VARIANTS_DIR / n for n in ("batch-invariant-prefill", "vllm-batch-invariant")]
    if all(n in k3 for n in ("batch-invariant-prefill", "vllm-batch-invariant")):
        mv = moved(*bi)  # vLLM's batch-invariant prefill against its decode, token by token
        if mv["shared"]:
            result["batch_invariant_decode_vs_prefill"] = {
                "tokens": mv["num_common"], "max_abs_delta": mv["infer"]["max_abs"],
                "bit_identical": mv["infer"]["max_abs"] == 0}  # fmt: skip
    result["verdict"] = diagnose_verdict(result)
    return json_ready(result)


def _baseline_k3_on(out: Path, path: Path) -> float:
    """The baseline's k3 over the token rows of the variant run `path` (the same seq_id and
    pos): what a variant that kept only some sequences is compared with."""
    from .metrics import k3
    from .runs import read_tokens

    b = read_tokens(out / VARIANTS_DIR / BASELINE, ["seq_id", "pos", "delta"])
    v = read_tokens(path, ["seq_id", "pos"])
    d = b.merge(v, on=["seq_id", "pos"])["delta"].to_numpy()
    return float(k3(d)) if len(d) else math.nan


def diagnose_verdict(result: dict[str, Any]) -> str:
    """The plain-words paragraph: the baseline, the largest single source, the floor at equal
    dtype, the share of bf16, the FP16 recipe, the null check, what was skipped."""
    from .attribution import attribution_verdict
    from .formatting import fmt, pct, ratio_x

    rows = {r["name"]: r for r in result["variants"]}
    ok = {n: r for n, r in rows.items() if r["k3"] is not None}
    parts: list[str] = []
    base = ok.get(BASELINE)
    if base is None:
        return "The baseline did not run: nothing to compare."
    bk3 = base["k3"]

    def share(r: dict[str, Any]) -> str:
        return pct(r["k3"] / bk3) if bk3 else "–"

    parts.append(
        f"The baseline ({base['inference']} vs {base['training']}) has k3 {fmt(bk3)} and mean "
        f"|delta| {fmt(base['mean_abs_delta'])} nats over {base['num_tokens']:,} tokens."
    )
    attr = {a["name"]: a for a in result.get("attribution") or []}
    if BASELINE in attr:
        parts.append(attribution_verdict(attr[BASELINE], "the baseline"))
        fp64 = (result.get("reference") or {}).get("fp64") or {}
        if fp64.get("err_rms") is not None:
            parts.append(reference_precision(fp64, attr[BASELINE]))
    top = result["sources"][0] if result["sources"] else None
    if top is not None:
        parts.append(
            f"The largest single source of the baseline's mismatch is {top['what']}: k3 "
            f"{fmt(top['k3'])}, "
            f"{pct(top['share_of_baseline_k3']) if top['share_of_baseline_k3'] is not None else '–'}"
            " of the baseline's."
        )
    if (f := ok.get("prefill-fp32")) is not None:
        ratio = f["k3"] / bk3 if bk3 else math.nan
        parts.append(
            f"With equal dtypes (fp32) the engines differ by k3 {fmt(f['k3'])} and mean |delta| "
            f"{fmt(f['mean_abs_delta'])} nats: {ratio_x(ratio)} the baseline's k3"
            + (" (far below it)." if ratio < 0.25 else " (NOT below a quarter of it).")
        )
    if (h := ok.get("hf-bf16-vs-fp32")) is not None and (top or {}).get("source") != h["name"]:
        parts.append(
            f"bf16 on the inference side, without any engine (transformers bf16 vs fp32), "
            f"gives k3 {fmt(h['k3'])}: {share(h)} of the baseline's k3."
        )
    if (pb := ok.get("prefill-bf16")) is not None:
        dvp = result.get("decode_vs_prefill") or {}
        parts.append(
            f"Scoring the same tokens with vLLM's bf16 prefill instead of its decode gives k3 "
            f"{fmt(pb['k3'])} ({ratio_x(pb['k3'] / bk3 if bk3 else math.nan)} the baseline's)"
            + (
                f"; decode and prefill log-probs differ from each other by k3 "
                f"{fmt(dvp.get('k3'))}, so each carries its own bf16 rounding."
                if dvp
                else "."
            )
        )
    if (t := ok.get("train-bf16")) is not None:
        parts.append(
            f"A bf16 trainer against the same bf16 rollouts has k3 {fmt(t['k3'])} "
            f"({ratio_x(t['k3'] / bk3 if bk3 else math.nan)} the baseline's)."
        )
    if (bs := ok.get("batch-shape")) is not None:
        if bs["max_abs_delta"] == 0 and bs["num_infinite"] == 0:
            parts.append(
                "Batched against one sequence per pass, transformers bf16 agreed bit for bit "
                "on these tokens: this machine's bf16 kernels are batch invariant at these shapes."
            )
        else:
            parts.append(
                f"A bf16 trainer is not batch invariant here: batched against one sequence per "
                f"pass, transformers bf16 gives k3 {fmt(bs['k3'])} "
                f"({ratio_x(bs['k3'] / bk3 if bk3 else math.nan)} the baseline's)."
            )
    if (p := ok.get("fp16-both")) is not None:
        parts.append(
            f"fp16 on both sides (vLLM prefill fp16 vs transformers fp16): k3 {fmt(p['k3'])} "
            f"({ratio_x(p['k3'] / bk3 if bk3 else math.nan)} the baseline's)."
        )
    if (d := ok.get(DECODE_REPEAT)) is not None:
        n, ident, total = d["num_tokens"], d["num_identical_sequences"], d["num_sequences"]
        where = f"the {n:,} tokens of the {ident} of {total} sequences that came out identical"
        if d["num_tokens_moved"] == 0:
            text = (
                f"Decoding again with the same seeds reproduced logp_infer bit for bit on {where}"
            )
        else:
            text = (
                f"Decoding again with the same seeds moved logp_infer on "
                f"{d['num_tokens_moved']:,} of {where} (mean |delta| "
                f"{fmt(d['mean_abs_delta'])}, max {fmt(d['max_abs_delta'])})"
            )
        if total is not None and ident is not None and ident < total:
            text += f"; {total - ident} sampled different tokens: the engine is not deterministic"
        parts.append(text + ".")
    if (n := ok.get(NULL)) is not None:
        zero = n["max_abs_delta"] == 0 and n["num_infinite"] == 0
        parts.append(
            "The null check is exactly 0, as it must be."
            if zero
            else f"The null check is NOT 0 (max |delta| {fmt(n['max_abs_delta'])}): the two "
            "sides are not compared like with like; distrust the other rows."
        )
    for r in result["variants"]:  # the opt-in rows that ran, each against its reference
        if r.get("against") and r["k3"] is not None:
            x = r.get("k3_vs_against")
            tail = (f" ({ratio_x(x)} {r['against']}'s"
                    + (" on the same tokens)" if "baseline_k3_same_tokens" in r else ")")
                    if x is not None else "")  # fmt: skip
            parts.append(f"{r['name']} ({r['isolates']}): k3 {fmt(r['k3'])}{tail}.")
        elif r["name"] in ("packed", "padding-left") and r["k3"] is not None:
            parts.append(
                f"{r['name']} ({r['isolates']}): "
                + ("bit for bit the same log-probs."
                   if r["max_abs_delta"] == 0 and r["num_infinite"] == 0
                   else f"k3 {fmt(r['k3'])}, max |delta| {fmt(r['max_abs_delta'])}.")
            )  # fmt: skip
    skipped = [r["name"] for r in result["variants"] if r["skipped"]]
    if skipped:
        parts.append(f"Skipped here: {', '.join(skipped)} (reasons in the table).")
    return " ".join(parts)


def reference_precision(fp64: dict[str, Any], row: dict[str, Any]) -> str:
    """The float32 reference's own error (its distance from float64) beside the baseline's
    two side errors: a side whose error is within 3x of it is as exact as the reference can
    tell, and is named so."""
    from .formatting import fmt

    e = fp64["err_rms"]
    text = (
        f"The reference itself is {fmt(e)} nats rms from float64 on {fp64['num_tokens']:,} tokens"
    )
    within = [
        side
        for side, key in (("inference", "err_infer_rms"), ("training", "err_train_rms"))
        if row.get(key) is not None and row[key] <= 3 * e
    ]
    if not within:
        return text + ": far below both sides' errors, so they are measured, not rounding."
    return (
        text + f": the {' and '.join(within)} side's error is within 3x of it, as exact as "
        "this reference can tell."
    )


def draw_diagnose(out: Path, result: dict[str, Any], formats: Sequence[str] = ("png",),
                  notes: list[str] | None = None) -> list[Path]:  # fmt: skip
    """Draw the `diagnose` figure of a diagnose directory into DIR/figures."""
    from .plots import make_figures

    runs = [r for r in result["variants"] if r["run"]]
    return make_figures(
        [r["run"] for r in runs],
        out / "figures",
        formats,
        [r["name"] for r in runs],
        figures=["diagnose"],
        notes=notes,
    )


__all__ = [
    "ATTRIBUTION_KEYS",
    "BASELINE",
    "CPU",
    "CUDA",
    "DEFAULT_VARIANTS",
    "REFERENCE",
    "REFERENCE_FP64",
    "REFERENCE_OPTIONS",
    "RUNS_ON",
    "SIDES",
    "SOURCES",
    "TWO_GPUS",
    "VARIANTS",
    "VARIANT_NAMES",
    "Variant",
    "diagnose_verdict",
    "draw_diagnose",
    "parse_variants",
    "run_diagnose",
    "summarize",
    "variant_matrix",
]
