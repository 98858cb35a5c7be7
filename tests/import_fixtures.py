"""Fixture writers: each framework's dump format, written from a KNOWN run, with the
padding and alignment quirks of the real thing (docs/import.md), so an import can be
checked token by token against the run it came from.

`known_run` is a synthetic run (synthetic.synthetic_tables) whose log-probs are rounded to
float32 (the tensors of slime, SkyRL and verl hold float32, so a round trip through any
format is exact). Every writer takes a `Known` (its completions, optionally with tool spans
inserted) and writes files; `Known.expected()` is the token table an import must produce.

Pickles are written without the frameworks: stand-in classes registered under the
frameworks' module names (`fake_modules`) pickle exactly as the real ones do (the golden
files in tests/data/, written by the frameworks' own code, check the readers against the
real layout).
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mismatch_cli.runs import token_frame, write_run
from mismatch_cli.synthetic import synthetic_meta, synthetic_tables

TOOL_ID = 5  # token id of inserted tool / observation tokens


@dataclass
class Completion:
    """One completion of the known run: prompt, completion tokens (tool spans included),
    the model-token mask and both sides' log-probs (NaN on tool tokens)."""

    prompt: np.ndarray  # [P] int64
    tokens: np.ndarray  # [R] int64
    mask: np.ndarray  # [R] bool, True = model token
    logp_infer: np.ndarray  # [R] float64
    logp_train: np.ndarray  # [R] float64
    step: int
    env: str
    advantage: float


@dataclass
class Known:
    """A known run as completions, and the token table an import of it must produce."""

    completions: list[Completion]
    tokens: pd.DataFrame  # the known run's token table (model tokens only)
    nulls: list[tuple[int, int]] = field(default_factory=list)  # (completion, pos) set to null

    def expected(self) -> pd.DataFrame:
        """seq (completion index), pos (index in the completion), token_id, logp_infer,
        logp_train, delta, step, env: one row per model token with non-null log-probs."""
        rows = []
        null = set(self.nulls)
        for j, c in enumerate(self.completions):
            pos = np.flatnonzero(c.mask)
            keep = np.array([(j, int(p)) not in null for p in pos], dtype=bool)
            pos = pos[keep]
            rows.append(
                pd.DataFrame(
                    {
                        "seq": j,
                        "pos": pos.astype(np.int32),
                        "token_id": c.tokens[pos].astype(np.int32),
                        "logp_infer": c.logp_infer[pos],
                        "logp_train": c.logp_train[pos],
                        "step": c.step,
                        "env": c.env,
                    }
                )
            )
        df = pd.concat(rows, ignore_index=True)
        df["delta"] = df["logp_infer"] - df["logp_train"]
        return df

    def num_dropped(self) -> int:
        return int(sum((~c.mask).sum() for c in self.completions))

    def write_reference(self, path: Path) -> Path:
        """The known run (model tokens with non-null log-probs) as a run directory."""
        e = self.expected()
        tok = token_frame(
            {
                "seq_id": e["seq"].to_numpy(np.int64),
                "pos": e["pos"].to_numpy(np.int32),
                "token_id": e["token_id"].to_numpy(np.int32),
                "logp_infer": e["logp_infer"].to_numpy(),
                "logp_train": e["logp_train"].to_numpy(),
                "eps_hat": np.full(len(e), np.nan),
            }
        )
        seqs = pd.DataFrame({"seq_id": np.arange(len(self.completions), dtype=np.int64)})
        return write_run(path, tok, seqs, synthetic_meta())


def known_run(
    num_sequences: int = 12,
    max_len: int = 20,
    seed: int = 0,
    tool_spans: bool = True,
    steps: tuple[int, ...] = (3, 4),
    envs: tuple[str, ...] = ("math", "code", "chat"),
    nulls: int = 0,
) -> Known:
    """A synthetic run (vocab 64) as completions: log-probs rounded to float32; with
    `tool_spans`, every third completion gets 3 masked tool tokens inserted mid-way (their
    log-probs NaN); completions alternate over `steps` and `envs`; `nulls` model tokens get
    a null trainer log-prob (an import drops and counts them)."""
    tokens, _ = synthetic_tables(num_sequences=num_sequences, max_len=max_len, vocab=64, seed=seed)
    rng = np.random.default_rng(seed)
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    comps = []
    for j, (_, g) in enumerate(tokens.groupby("seq_id", sort=True)):
        tok = g["token_id"].to_numpy(np.int64)
        li, lt = f32(g["logp_infer"].to_numpy()), f32(g["logp_train"].to_numpy())
        mask = np.ones(tok.size, bool)
        if tool_spans and j % 3 == 1 and tok.size > 2:
            k = tok.size // 2
            tok = np.concatenate([tok[:k], np.full(3, TOOL_ID), tok[k:]])
            li = np.concatenate([li[:k], np.full(3, np.nan), li[k:]])
            lt = np.concatenate([lt[:k], np.full(3, np.nan), lt[k:]])
            mask = np.concatenate([mask[:k], np.zeros(3, bool), mask[k:]])
        prompt = rng.integers(6, 64, size=int(rng.integers(2, 7)))
        if j % 4 == 1:  # GRPO-like: two completions of one prompt
            prompt = comps[-1].prompt.copy()
        comps.append(
            Completion(prompt, tok, mask, li, lt, steps[j % len(steps)], envs[j % len(envs)],
                       float(rng.normal()))
        )  # fmt: skip
    known = Known(comps, tokens)
    for j in range(nulls):
        c = comps[(2 * j) % len(comps)]
        p = int(np.flatnonzero(c.mask)[-1])
        c.logp_train[p] = np.nan
        known.nulls.append(((2 * j) % len(comps), p))
    return known


def _jsonable(a: np.ndarray) -> list[Any]:
    """Floats with NaN -> None (frameworks write non-finite values as null)."""
    return [None if not np.isfinite(v) else float(v) for v in a]


# ----------------------------------------------------------------------------- prime-rl


def write_prime_rl(
    known: Known, root: Path, ranks: int = 3, pack: bool = True, stable: bool = True
) -> Path:
    """`root/token_exports/step_N/rank_R.jsonl` (+ STABLE). One record per sample: token_ids
    = prompt + completion, loss_mask false on the prompt and tool tokens, position_ids
    0..n-1, inference_logprobs 0.0 on context, trainer_logprobs log(1/V) at position 0 (the
    shift's pad) and garbage elsewhere on context; with `pack`, every 4th record holds two
    samples (position_ids restart at 0), as the issue's packed records do. Every record
    carries the other keys prime-rl writes (null arrays when absent)."""
    out = root / "token_exports"
    by_file: dict[tuple[int, int], list[dict]] = {}
    pending: dict | None = None
    for j, c in enumerate(known.completions):
        n = c.prompt.size + c.tokens.size
        li = np.concatenate([np.zeros(c.prompt.size), c.logp_infer])
        lt = np.concatenate([np.full(c.prompt.size, -3.3), c.logp_train])
        lt[0] = np.log(1 / 64)
        mask = np.concatenate([np.zeros(c.prompt.size, bool), c.mask])
        li[np.isnan(li) & ~mask] = 0.0
        lt[np.isnan(lt) & ~mask] = -1.0
        rec = {
            "schema_version": 1,
            "step": c.step,
            "rank": j % ranks,
            "micro_step": j // 4,
            "micro_sequence_idx": j % 4,
            "export_sequence_idx": j,
            "env_name": c.env,
            "token_ids": np.concatenate([c.prompt, c.tokens]).tolist(),
            "position_ids": list(range(n)),
            "loss_mask": mask.tolist(),
            "advantages": [c.advantage] * n,
            "inference_logprobs": _jsonable(li),
            "trainer_logprobs": _jsonable(lt),
            "entropy": [0.5] * n,
            "mismatch_kl": [0.0] * n,
            "log_importance_ratio": _jsonable(lt - li),
            "importance_ratio": _jsonable(np.exp(lt - li)),
            "prob_delta": [0.0] * n,
            "is_masked": [None] * n,
            "is_masked_high": [None] * n,
            "is_masked_low": [None] * n,
            "rl_weights": [None] * n,
            "ce_weights": [None] * n,
            "ref_kl_weights": [None] * n,
        }
        key = (c.step, j % ranks)
        if pack and j % 4 == 2:
            pending = rec  # packed with the next sample of the same file
            continue
        if pending is not None and (pending["step"], pending["rank"]) == key:
            for k, v in rec.items():
                if isinstance(v, list):
                    rec[k] = pending[k] + v
            pending = None
        elif pending is not None:
            p = pending
            by_file.setdefault((p["step"], p["rank"]), []).append(p)
            pending = None
        by_file.setdefault(key, []).append(rec)
    if pending is not None:
        by_file.setdefault((pending["step"], pending["rank"]), []).append(pending)
    for (step, rank), recs in by_file.items():
        d = out / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank_{rank}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n")
        if stable:
            (d / "STABLE").touch()
    return root


def prime_rl_order(known: Known, ranks: int = 3, pack: bool = True) -> list[int]:
    """The completion indices in the order an import of `write_prime_rl` reads them (files
    sorted by step then rank; records in file order; packed samples in order)."""
    keys: dict[tuple[int, int], list[int]] = {}
    pending = None
    for j, c in enumerate(known.completions):
        key = (c.step, j % ranks)
        if pack and j % 4 == 2:
            pending = (key, j)
            continue
        if pending is not None and pending[0] == key:
            keys.setdefault(key, []).extend([pending[1], j])
            pending = None
            continue
        if pending is not None:
            keys.setdefault(pending[0], []).append(pending[1])
            pending = None
        keys.setdefault(key, []).append(j)
    if pending is not None:
        keys.setdefault(pending[0], []).append(pending[1])
    return [j for k in sorted(keys) for j in keys[k]]


# ----------------------------------------------------------------------------- tokens


def tokens_rows(known: Known, per_token_advantage: bool = False) -> list[dict[str, Any]]:
    rows = []
    for c in known.completions:
        rows.append(
            {
                "prompt_token_ids": c.prompt.tolist(),
                "response_token_ids": c.tokens.tolist(),
                "logprobs_infer": _jsonable(c.logp_infer),
                "logprobs_train": _jsonable(c.logp_train),
                "loss_mask": c.mask.astype(int).tolist(),
                "step": c.step,
                "env": c.env,
                "advantage": [c.advantage] * c.tokens.size if per_token_advantage else c.advantage,
                "reward": 1.0,
                "seq": 0,  # an extra field: ignored
            }
        )
    return rows


def write_tokens_jsonl(known: Known, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in tokens_rows(known, **kw):
            f.write(json.dumps(r) + "\n")
    return path


def write_tokens_parquet(known: Known, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(tokens_rows(known, **kw)).to_parquet(path)
    return path


# ----------------------------------------------------------------------------- slime


def write_slime(known: Known, root: Path, kind: str = "train") -> list[Path]:
    """`root/{train_data|rollout_data}/{rollout_id}.pt`, one file per step, as slime's
    `torch.save` payloads: train dumps (format_version 2) hold per-sample tensors
    (tokens long, loss_masks int32, float32 log-probs); rollout dumps hold lists and
    `loss_mask` None for completions without tool tokens."""
    import torch

    paths = []
    for step in sorted({c.step for c in known.completions}):
        samples = []
        for c in known.completions:
            if c.step != step:
                continue
            R = c.tokens.size
            toks = np.concatenate([c.prompt, c.tokens])
            li = np.nan_to_num(c.logp_infer, nan=0.0)  # tool tokens get 0.0
            if kind == "train":
                samples.append(
                    {
                        "tokens": torch.as_tensor(toks, dtype=torch.long),
                        "response_lengths": R,
                        "total_lengths": toks.size,
                        "loss_masks": torch.as_tensor(c.mask, dtype=torch.int32),
                        "rollout_log_probs": torch.as_tensor(li, dtype=torch.float32),
                        "log_probs": torch.as_tensor(
                            np.nan_to_num(c.logp_train), dtype=torch.float32
                        ),
                        "advantages": torch.full((R,), c.advantage, dtype=torch.float32),
                        "rewards": 0.5,
                        "truncated": 0,
                    }
                )
            else:
                samples.append(
                    {
                        "tokens": toks.tolist(),
                        "response_length": R,
                        "loss_mask": None if c.mask.all() else c.mask.astype(int).tolist(),
                        "rollout_log_probs": li.tolist(),
                        "reward": 1.0,
                        "status": "completed",
                        "metadata": {},
                    }
                )
        payload = {"rollout_id": step, "samples": samples}
        if kind == "train":
            payload = {"format_version": 2, "rank": 0, **payload, "dp_shards": []}
        d = root / ("train_data" if kind == "train" else "rollout_data")
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{step}.pt"
        torch.save(payload, p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- pickles


@contextmanager
def fake_modules(**objects: dict[str, Any]) -> Iterator[None]:
    """Register modules named like a framework's (dots allowed: pass a dict keyed by the
    module name through **{...}) holding `objects`, so pickle writes exactly the global
    names the framework's own classes would; removed afterwards."""
    added = []
    try:
        for mod_name, members in objects.items():
            parts = mod_name.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    added.append(name)
            mod = sys.modules[mod_name]
            for k, v in members.items():
                v.__module__ = mod_name
                v.__qualname__ = k
                setattr(mod, k, v)
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _pad_left(rows: list[np.ndarray], pad: int) -> np.ndarray:
    W = max((r.size for r in rows), default=0)
    out = np.full((len(rows), W), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, W - r.size :] = r
    return out


def _pad_right(rows: list[np.ndarray], pad: float, dtype: Any) -> np.ndarray:
    W = max((r.size for r in rows), default=0)
    out = np.full((len(rows), W), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def skyrl_arrays(
    known: Known, step: int, pad_size: int = 1, with_train: bool = True, layout: str = "new"
) -> dict:
    """SkyRL's training batch of one step, as each release lays it out (checked against the
    dumps in tests/data/skyrl/, written by the releases' own code):
    "new" (skyrl >= 0.2.0): each row left-padded as one block, response tensors
    right-aligned, `pad_size` copies of row 0 appended;
    "old" (skyrl_train <= 0.3.1, skyrl 0.1.0): a left-padded prompt block then the
    right-padded response, response tensors left-aligned, copies of rows [0, pad_size)
    appended. Padding rows get loss_mask 0; the pad id is 0."""
    comps = [c for c in known.completions if c.step == step]
    R = max(c.tokens.size for c in comps)
    if layout == "new":
        seqs = _pad_left([np.concatenate([c.prompt, c.tokens]) for c in comps], 0)
        att = _pad_left([np.ones(c.prompt.size + c.tokens.size, np.int64) for c in comps], 0)
    else:
        P = max(c.prompt.size for c in comps)
        seqs = np.zeros((len(comps), P + R), np.int64)
        att = np.zeros((len(comps), P + R), np.int64)
        for i, c in enumerate(comps):
            seqs[i, P - c.prompt.size : P + c.tokens.size] = np.concatenate([c.prompt, c.tokens])
            att[i, P - c.prompt.size : P + c.tokens.size] = 1

    def place(vals: list[np.ndarray], dtype: Any) -> np.ndarray:
        out = np.zeros((len(vals), R), dtype=dtype)
        for i, v in enumerate(vals):
            if layout == "new":
                out[i, R - v.size :] = v
            else:
                out[i, : v.size] = v
        return out

    arrays = {
        "sequences": seqs,
        "attention_mask": att,
        "response_mask": place([np.ones(c.tokens.size, np.int64) for c in comps], np.int64),
        "loss_mask": place([c.mask.astype(np.float32) for c in comps], np.float32),
        "rollout_logprobs": place([np.nan_to_num(c.logp_infer) for c in comps], np.float32),
        "action_log_probs": place([np.nan_to_num(c.logp_train) for c in comps], np.float32)
        if with_train
        else None,
        "advantages": place([np.full(c.tokens.size, c.advantage) for c in comps], np.float32),
        "base_action_log_probs": None,
    }
    copies = [0] * pad_size if layout == "new" else list(range(pad_size))
    for k, v in arrays.items():
        if v is not None and pad_size:
            pad_rows = v[copies].copy()
            if k == "loss_mask":
                pad_rows[:] = 0
            arrays[k] = np.concatenate([v, pad_rows])
    return arrays


def _skyrl_entry(v: np.ndarray | None) -> Any:
    if v is None:
        return None
    return {"format": "numpy", "data": v.tobytes(), "shape": v.shape, "dtype": str(v.dtype)}


def write_skyrl(
    known: Known,
    root: Path,
    layout: str = "new",
    pad_size: int = 1,
    with_train: bool = True,
    inject: Any = None,
    mutate: Any = None,
) -> list[Path]:
    """`root/dumped_data/global_step_{N}_training_input.pkl` per step, pickled as SkyRL's
    TrainingInputBatch: layout "new" (skyrl 0.2.0-0.3.x: `_rebuild_tensor_batch(cls,
    state)`, numpy bytes, right-aligned), "enum" (skyrl 0.4.0: the same with each format a
    `TensorFormat` StrEnum member), "old" (skyrl_train <= 0.3.1: default dict pickle,
    tensor items, then a state of torch.save bytes per key, None included; left-aligned).
    `inject(state)`, if given, may change the pickled state (crafted-file tests);
    `mutate(arrays)` the arrays before they are encoded (bad-value tests)."""
    from enum import StrEnum

    import torch

    mod = (
        "skyrl_train.training_batch"
        if layout == "old"
        else "skyrl.backends.skyrl_train.training_batch"
    )

    class TensorFormat(StrEnum):
        NUMPY = "numpy"
        TORCH = "torch"

    def _rebuild_tensor_batch(cls, state):  # pragma: no cover - never called here
        raise AssertionError

    class TrainingInputBatch(dict):
        pass

    paths = []
    d = root / "dumped_data"
    d.mkdir(parents=True, exist_ok=True)
    for step in sorted({c.step for c in known.completions}):
        arrays = skyrl_arrays(
            known, step, pad_size, with_train, "old" if layout == "old" else "new"
        )
        if mutate is not None:
            mutate(arrays)
        meta = {"response_length": arrays["response_mask"].shape[1], "pad_size": pad_size,
                "policy_mini_batch_boundaries": [0]}  # fmt: skip
        if layout != "old":
            entries = {k: _skyrl_entry(v) for k, v in arrays.items()}
            if layout == "enum":
                for e in entries.values():
                    if e is not None:
                        e["format"] = TensorFormat(e["format"])
            state = {"batch_dict": entries,
                     "batch_size": len(arrays["sequences"]), "device": torch.device("cpu"),
                     "metadata": meta}  # fmt: skip
            if inject is not None:
                inject(state)

            def reduce(self, state=state):
                return (_rebuild_tensor_batch, (type(self), state))

            TrainingInputBatch.__reduce__ = reduce
            batch = TrainingInputBatch()
        else:

            def to_bytes(v: np.ndarray | None) -> bytes:  # skyrl_train: torch.save(None) too
                buf = io.BytesIO()
                torch.save(None if v is None else torch.from_numpy(v), buf)
                return buf.getvalue()

            state = {"batch_dict": {k: to_bytes(v) for k, v in arrays.items()},
                     "batch_size": len(arrays["sequences"]), "device": torch.device("cpu"),
                     "metadata": meta}  # fmt: skip
            if inject is not None:
                inject(state)
            TrainingInputBatch.__getstate__ = lambda self, state=state: state
            batch = TrainingInputBatch(
                {k: None if v is None else torch.from_numpy(v) for k, v in arrays.items()}
            )
        with fake_modules(**{mod: {"_rebuild_tensor_batch": _rebuild_tensor_batch,
                                   "TrainingInputBatch": TrainingInputBatch,
                                   "TensorFormat": TensorFormat}}):  # fmt: skip
            p = d / f"global_step_{step}_training_input.pkl"
            p.write_bytes(pickle.dumps(batch))
        paths.append(p)
    return paths


def verl_arrays(known: Known, step: int, prompt_len: int = 8, response_len: int = 32) -> dict:
    """verl's gen_batch of one step: prompts LEFT-padded to prompt_len, responses RIGHT-
    padded to response_len (tool tokens included, response_mask 0 on them and on padding),
    rollout_log_probs zero-padded, attention_mask over prompt + response."""
    comps = [c for c in known.completions if c.step == step]
    P = max(prompt_len, max(c.prompt.size for c in comps))
    R = max(response_len, max(c.tokens.size for c in comps))
    B = len(comps)
    prompts = np.full((B, P), 0, np.int64)
    responses = np.full((B, R), 0, np.int64)
    rmask = np.zeros((B, R), np.int64)
    att = np.zeros((B, P + R), np.int64)
    lp = np.zeros((B, R), np.float32)
    for i, c in enumerate(comps):
        prompts[i, P - c.prompt.size :] = c.prompt
        att[i, P - c.prompt.size : P] = 1
        n = c.tokens.size
        responses[i, :n] = c.tokens
        rmask[i, :n] = c.mask
        att[i, P : P + n] = 1
        lp[i, :n] = np.nan_to_num(c.logp_infer)
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": rmask,
        "input_ids": np.concatenate([prompts, responses], axis=1),
        "attention_mask": att,
        "position_ids": np.maximum(np.cumsum(att, axis=1) - 1, 0),
        "rollout_log_probs": lp,
    }


def _consolidated_td(arrays: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """tensordict's consolidated layout: one uint8 storage, each leaf padded to 8 bytes."""
    leaves, chunks, off = {}, [], 0
    for k, v in arrays.items():
        b = np.ascontiguousarray(v).view(np.uint8).ravel()
        pad = (-b.size) % 8
        leaves[k] = (f"torch.{v.dtype}", list(v.shape), off, off + b.size, pad)
        chunks.extend([b, np.zeros(pad, np.uint8)])
        off += b.size + pad
    B = len(next(iter(arrays.values())))
    meta = {
        "cls": "TensorDict",
        "cls_metadata": {"batch_size": [B], "device": None, "names": [None], "is_locked": False},
        "non_tensors": {},
        "leaves": leaves,
    }
    return meta, np.concatenate(chunks)


def write_verl(
    known: Known,
    root: Path,
    method: str = "torch",
    inject: Any = None,
    mutate: Any = None,
    **kw: Any,
) -> list[Path]:
    """`root/exp_proj/GBS4_N2_in8_out32/{step}/gen_batch.dp` + meta.json per step: a pickle
    of DataProto whose state is (batch, non_tensor_batch, meta_info); `method` "torch":
    batch = torch.save bytes of a consolidated TensorDict; "numpy": verl's
    VERL_DATAPROTO_SERIALIZATION_METHOD=numpy tuple. `inject(state) -> state`, if given,
    replaces the pickled state (crafted-file tests); `mutate(arrays)` changes the arrays
    before they are encoded (bad-value tests)."""
    import torch

    def _rebuild_tensordict_files_consolidated(meta, flat):  # pragma: no cover - never called
        raise AssertionError

    class DataProto:
        pass

    class _TD:
        def __init__(self, meta, flat):
            self.meta, self.flat = meta, flat

        def __reduce__(self):
            return (
                _rebuild_tensordict_files_consolidated,
                (self.meta, torch.from_numpy(self.flat)),
            )

    paths = []
    for step in sorted({c.step for c in known.completions}):
        arrays = verl_arrays(known, step, **kw)
        if mutate is not None:
            mutate(arrays)
        B = len(arrays["prompts"])
        envs = [c.env for c in known.completions if c.step == step]
        non_tensor = {"uid": np.array([f"u{i // 2}" for i in range(B)], dtype=object),
                      "data_source": np.array(envs, dtype=object),
                      "__num_turns__": np.full(B, 2, np.int32)}  # fmt: skip
        meta_info = {"timing": {"gen": np.float64(1.5)}}
        with fake_modules(**{
            "tensordict._reductions": {"_rebuild_tensordict_files_consolidated": _rebuild_tensordict_files_consolidated},
            "verl.protocol": {"DataProto": DataProto},
        }):  # fmt: skip
            if method == "torch":
                buf = io.BytesIO()
                torch.save(_TD(*_consolidated_td(arrays)), buf)
                batch: Any = buf.getvalue()
            else:
                batch = ((B,), None, {k: (str(v.dtype), torch.Size(v.shape),
                                          np.ascontiguousarray(v).view(np.uint8).ravel())
                                      for k, v in arrays.items()})  # fmt: skip
            state = (batch, non_tensor, meta_info)
            if inject is not None:
                state = inject(state)
            DataProto.__getstate__ = lambda self, state=state: state
            d = root / "exp_proj" / "GBS4_N2_in8_out32" / str(step)
            d.mkdir(parents=True, exist_ok=True)
            (d / "gen_batch.dp").write_bytes(pickle.dumps(DataProto()))
            (d / "meta.json").write_text(json.dumps({"global_steps": step}))
        paths.append(d / "gen_batch.dp")
    return paths
