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

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import MeasureConfig
from .errors import MismatchError, first_line
from .pipeline import Progress, run_measure
from .rescore_run import DECODE_REPEAT, RescoreOptions, decode_repeat, rescore_run
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


@dataclass(frozen=True)
class Variant:
    """One row of the matrix: what it isolates, its two sides (short descriptions), its role
    (`reference`, `setting` a user could adopt, `source` of mismatch it measures alone,
    `check`), and how it is built from the baseline (`rescore` options; None for the
    baseline itself and for decode-repeat)."""

    name: str
    isolates: str
    inference: str
    training: str
    role: str
    rescore: RescoreOptions | None = None


_FP32, _BF16 = "float32", "bfloat16"
VARIANTS: tuple[Variant, ...] = (
    Variant(BASELINE, "what an RL run sees", "vLLM decode, bf16", "transformers fp32, eager",
            "reference"),
    Variant("train-bf16", "the usual FSDP bf16 trainer", "vLLM decode, bf16",
            "transformers bf16, eager", "setting", RescoreOptions(train_dtype=_BF16)),
    Variant("prefill-bf16", "decode path vs prefill path", "vLLM prefill, bf16",
            "transformers fp32, eager", "setting",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype=_BF16)),
    Variant("prefill-fp32", "the engine floor at equal dtype", "vLLM prefill, fp32",
            "transformers fp32, eager", "source",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype=_FP32)),
    Variant("fp16-both", "the FP16 recipe", "vLLM prefill, fp16", "transformers fp16, eager",
            "setting",
            RescoreOptions(infer_side="vllm-prefill", infer_dtype="float16",
                           train_dtype="float16")),
    Variant("hf-bf16-vs-fp32", "dtype alone, no engine", "transformers bf16, eager",
            "transformers fp32, eager", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16)),
    Variant("batch-shape", "trainer batch invariance", "transformers bf16, batched",
            "transformers bf16, one sequence per pass", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_BF16, train_dtype=_BF16,
                           rescore_batch_tokens=1)),
    Variant("attention", "attention kernel", "transformers fp32, eager",
            "transformers fp32, sdpa", "source",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_FP32,
                           attn_implementation="sdpa")),
    Variant(DECODE_REPEAT, "the engine's own run-to-run noise",
            "vLLM decode, bf16, run again with the same seeds", "the first decode's logp_infer",
            "source"),
    Variant(NULL, "must be exactly 0", "transformers fp32 prefill", "the same call", "check",
            RescoreOptions(infer_side="hf-prefill", infer_dtype=_FP32)),
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


def parse_variants(spec: str | Sequence[str] | None) -> list[str]:
    """Variant names from '--variants a,b' (None or 'all': every one), in matrix order; the
    baseline is always included (every other variant is built from it)."""
    if spec is None:
        return list(VARIANT_NAMES)
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
        raise MismatchError(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANT_NAMES)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MismatchError(f"--variants names {', '.join(twice)} twice: name each once")
    return [n for n in VARIANT_NAMES if n in names or n == BASELINE]


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
    skipped with its one-line reason, reported through `progress.log` and in `skipped`."""
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
            run_measure(cfg, base, progress=prog)
        seconds = {BASELINE: time.perf_counter() - t0}
        skipped: dict[str, str] = {}
        refs = _build_references(base, work, out, reference, reference_fp64, seconds, skipped, prog)
        for name in names[1:]:
            v = _BY_NAME[name]
            path = vdir / name
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
            "run": None if name in skipped else str((at or out) / VARIANTS_DIR / name),
            "skipped": skipped.get(name),
            "seconds": round(seconds.get(name, math.nan), 1),
            **{k: None for k in VARIANT_KEYS},
            **{k: None for k in ATTRIBUTION_KEYS},
        }
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
        rows.append(row)
    k3 = {r["name"]: r["k3"] for r in rows if r["k3"] is not None}
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
    }
    result["verdict"] = diagnose_verdict(result)
    return json_ready(result)


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
    "REFERENCE",
    "REFERENCE_FP64",
    "REFERENCE_OPTIONS",
    "SOURCES",
    "VARIANTS",
    "VARIANT_NAMES",
    "Variant",
    "diagnose_verdict",
    "draw_diagnose",
    "parse_variants",
    "run_diagnose",
    "summarize",
]
