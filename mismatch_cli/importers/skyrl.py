"""SkyRL training-batch dumps (`trainer.dump_data_batch: true`, NovaSky-AI/SkyRL @ a956457).

Files: `{trainer.export_path}/dumped_data/global_step_{N}_training_input.pkl`, a pickle of
`TrainingInputBatch` (a dict of tensors + metadata) written just before the policy update.
Layout, per row i of B (S = sequence width, R = response width):
    sequences [B, S]       prompt + response, LEFT-padded as one block
    attention_mask [B, S]  1 = real token
    response_mask [B, R]   1 on the last r_i columns: response-level tensors are RIGHT-aligned
    loss_mask [B, R]       0 = tool / observation tokens (or dropped samples)
    rollout_logprobs [B, R]  inference log-probs (0.0 in the padding)
    action_log_probs [B, R]  trainer log-probs before the update (None when SkyRL skipped
                             that forward: then rescore)
    advantages [B, R]
The response of row i is sequences[i, S - r_i:], its prompt the attention-masked tokens
before it. `metadata["pad_size"]` rows at the END are copies of row 0 added for the DP
split: they are dropped. The step is the N of the file name. Sign: SkyRL logs
|rollout - action|; delta = rollout_logprobs - action_log_probs.

The pickle is read without SkyRL or torch (`pickles.Restricted`): the current format
(`_rebuild_tensor_batch(cls, state)`, tensors as numpy bytes, bfloat16 as torch.save bytes)
and the older default dict pickles (tensor items, then a state holding numpy bytes or
torch.save bytes per key) under both module paths (`skyrl_train.` and `skyrl.backends.`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MismatchError
from .pickles import as_dtype, from_bytes, load_torch_zip, read_bytes, restricted_load
from .toolkit import Chunk, ReadContext, missing, require_trust

NAME = "skyrl"
PATTERNS = ("global_step_*_training_input.pkl",)
PICKLE = True
SIDES = "either"
SIGN = "SkyRL: rollout_logprobs (inference), action_log_probs (trainer); delta = rollout_logprobs - action_log_probs"
MODULES = ("skyrl.backends.skyrl_train.training_batch", "skyrl_train.training_batch")
CLASSES = ("TrainingInputBatch", "TrainingOutputBatch", "TensorBatch")
_REQUIRED = ("sequences", "attention_mask", "response_mask", "rollout_logprobs")


class _Batch(dict):
    """Stand-in for SkyRL's TensorBatch: keeps the pickled state, does nothing else."""

    state: dict[str, Any] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def _rebuild_batch(cls: Any, state: dict[str, Any]) -> _Batch:
    obj = _Batch()
    obj.state = state
    return obj


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("torch", "device"): str}
    for mod in MODULES:
        allowed[(mod, "_rebuild_tensor_batch")] = _rebuild_batch
        for cls in CLASSES:
            allowed[(mod, cls)] = _Batch
    # old default dict pickles also pickle the items as tensors; the state replaces them
    allowed[("torch._utils", "_rebuild_tensor_v2")] = lambda *a: None
    allowed[("torch.storage", "_load_from_bytes")] = lambda b: None
    return allowed


def step_of(path: Path) -> int | None:
    m = re.search(r"global_step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def _load(path: Path, ctx: ReadContext) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """(tensors as numpy arrays, metadata) of one dump."""
    require_trust(path, NAME, ctx)
    obj = restricted_load(read_bytes(path), _allowed(), str(path))
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or "batch_dict" not in state:
        raise MismatchError(f"{path}: not a SkyRL training batch (no batch_dict in the pickle)")
    tensors = {k: _decode(v, f"{path} field {k}") for k, v in state["batch_dict"].items()}
    return tensors, dict(state.get("metadata") or {})


def _decode(value: Any, where: str) -> np.ndarray | None:
    """One batch_dict entry: None, numpy bytes, torch.save bytes (bf16) or a tensor list."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):  # oldest format: torch.save bytes per key
        return np.asarray(load_torch_zip(bytes(value), where))
    if isinstance(value, dict):
        fmt = value.get("format", "numpy")
        if fmt == "torch":
            return np.asarray(load_torch_zip(value["data"], where))
        if fmt == "numpy":
            return from_bytes(value["data"], as_dtype(value["dtype"], where), value["shape"]).copy()
        if fmt == "tensor_list":
            return None  # per-sample tensors (images): not needed here
    raise MismatchError(f"{where}: unknown tensor encoding {type(value).__name__}")


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """The rows of one dump (one step), padding rows dropped."""
    t, meta = _load(path, ctx)
    where = str(path)
    absent = [k for k in _REQUIRED if t.get(k) is None]
    if absent:
        raise missing(where, absent, " (is this a SkyRL training batch?)")
    seq, att, resp, lr = (t[k] for k in _REQUIRED)
    lt = t.get("action_log_probs")
    loss = t.get("loss_mask")
    adv = t.get("advantages")
    B, S = seq.shape
    R = resp.shape[1]
    for name, a in (("rollout_logprobs", lr), ("action_log_probs", lt), ("loss_mask", loss),
                    ("advantages", adv)):  # fmt: skip
        if a is not None and a.shape != (B, R):
            raise MismatchError(
                f"{where}: {name} has shape {list(a.shape)}, response_mask {[B, R]} (length mismatch)"
            )
    if att.shape != (B, S):
        raise MismatchError(
            f"{where}: attention_mask has shape {list(att.shape)}, sequences {[B, S]}"
        )
    pad = int(meta.get("pad_size") or 0)
    B = max(B - pad, 0)  # the last pad_size rows are copies of row 0
    r = resp[:B].astype(bool).sum(axis=1)  # [B] response lengths
    prompts, comps, li, ltr, lm, ad = [], [], [], [], [], []
    for i in range(B):
        n = int(r[i])
        cols = slice(R - n, R)  # right-aligned response columns
        prompts.append(seq[i, : S - n][att[i, : S - n].astype(bool)])
        comps.append(seq[i, S - n :])
        li.append(lr[i, cols])
        if lt is not None:
            ltr.append(lt[i, cols])
        lm.append(loss[i, cols] > 0 if loss is not None else np.ones(n, bool))
        if adv is not None:
            ad.append(adv[i, cols])
    cat = lambda rows, dt: np.concatenate(rows).astype(dt) if rows else np.zeros(0, dt)  # noqa: E731
    step = step_of(path)
    seq_extra: dict[str, np.ndarray] = {"source_row": np.arange(B, dtype=np.int64)}
    if step is not None:
        seq_extra["step"] = np.full(B, step, np.int64)
    yield Chunk(
        prompt_lens=np.array([len(p) for p in prompts], np.int64),
        prompt_ids=cat(prompts, np.int64),
        lens=r.astype(np.int64),
        token_ids=cat(comps, np.int64),
        logp_infer=cat(li, np.float64),
        loss_mask=cat(lm, bool),
        logp_train=cat(ltr, np.float64) if lt is not None else None,
        token_extra={"advantage": cat(ad, np.float64)} if adv is not None else {},
        seq_extra=seq_extra,
    )
