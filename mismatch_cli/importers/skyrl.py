"""SkyRL training-batch dumps (`trainer.dump_data_batch: true`), every release on PyPI:
`skyrl_train` 0.1.0-0.3.1 and `skyrl` 0.1.0-0.4.0 (NovaSky-AI/SkyRL; docs/import.md has the
table of releases and what changed between them).

Files: `{trainer.export_path}/dumped_data/global_step_{N}_training_input.pkl`, a pickle of
`TrainingInputBatch` (a dict of tensors + metadata) written just before the policy update.
Per row i of B (S = sequence width, R = response width, r_i = its response length):
    sequences [B, S]       prompt + response token ids
    attention_mask [B, S]  1 = real token
    response_mask [B, R]   1 on the r_i response columns
    loss_mask [B, R]       0 = tool / observation tokens (and DP padding rows)
    rollout_logprobs [B, R]  inference log-probs (0.0 outside the response)
    action_log_probs [B, R]  trainer log-probs before the update (None when SkyRL skipped
                             that forward: then rescore)
    advantages [B, R]
Two layouts, never assumed: the reader derives the layout from where response_mask's ones
are and checks it against attention_mask, the padding token ids, loss_mask and
rollout_logprobs before reading a token:
    right-aligned (skyrl >= 0.2.0, SkyRL commit b059319): each row left-padded as one
        block, the response in its last r_i columns (and the last r_i of the R columns);
    left-aligned (skyrl_train <= 0.3.1, skyrl 0.1.0): a left-padded prompt block of
        S - R columns, then the response, right-padded (the first r_i of the R columns).
A row whose response_mask is all 0 (an empty response) is skipped with a warning; ones
anywhere else, or rows of both layouts in one batch, are refused in one line.
`metadata["pad_size"]` rows at the END are copies added for the DP split (of row 0 in
skyrl, of rows [0, pad_size) in skyrl_train): they are dropped. The step is the N of the
file name. Sign: SkyRL logs |rollout - action|; delta = rollout_logprobs - action_log_probs.

The pickle is read without SkyRL or torch (`pickles.Restricted`), every class by its exact
name: the batch classes and `_rebuild_tensor_batch` under both module paths
(`skyrl_train.` and `skyrl.backends.skyrl_train.`), 0.4.0's `TensorFormat` enum (its value
checked against the five names that release defines), torch's tensor rebuild (the old
default dict pickle stores each tensor twice: as a dict item, ignored, and as
`torch.save` bytes in the state, read). The release is told from the class path and the
encoding; both it and the layout go into run.json's `source` block.
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


KNOWN = "skyrl_train 0.1.0-0.3.1 and skyrl 0.1.0-0.4.0"
# skyrl 0.4.0's TensorFormat(StrEnum) values (skyrl/backends/skyrl_train/training_batch.py)
TENSOR_FORMATS = ("numpy", "numpy_view", "torch", "tensor_list", "packed_tensor")
RIGHT, LEFT = "right-aligned", "left-aligned"


class _Batch(dict):
    """Stand-in for SkyRL's TensorBatch: keeps the pickled state, does nothing else."""

    module = ""  # the pickle's module path (set on each module's subclass)
    rebuilt = False  # pickled through `_rebuild_tensor_batch` (skyrl >= 0.2.0)
    state: dict[str, Any] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class _EnumFormat(str):
    """A TensorFormat member read from the pickle: its value, marked as an enum."""


def _tensor_format(value: Any) -> _EnumFormat:
    """Stand-in for `TensorFormat(value)`: only the values the release defines."""
    if value not in TENSOR_FORMATS:
        raise MismatchError(
            f"unknown SkyRL TensorFormat {value!r} (known: {', '.join(TENSOR_FORMATS)}; this "
            f"reader knows {KNOWN} dumps)"
        )
    return _EnumFormat(value)


def _allowed() -> dict[tuple[str, str], Any]:
    """Every name a supported release's pickle holds, by exact (module, name)."""
    allowed: dict[tuple[str, str], Any] = {("torch", "device"): str}
    for mod in MODULES:
        batch = type("_Batch", (_Batch,), {"module": mod})

        def rebuild(cls: Any, state: dict[str, Any], batch: type = batch) -> _Batch:
            obj = batch()
            obj.rebuilt, obj.state = True, state
            return obj

        allowed[(mod, "_rebuild_tensor_batch")] = rebuild
        allowed[(mod, "TensorFormat")] = _tensor_format
        for cls in CLASSES:
            allowed[(mod, cls)] = batch
    # old default dict pickles also pickle the items as tensors; the state replaces them
    allowed[("torch._utils", "_rebuild_tensor_v2")] = lambda *a: None
    allowed[("torch.storage", "_load_from_bytes")] = lambda b: None
    return allowed


def step_of(path: Path) -> int | None:
    m = re.search(r"global_step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def release_of(obj: _Batch, entries: dict[str, Any]) -> tuple[str, str]:
    """(release range, pickle encoding) told from the class path and how tensors are stored."""
    kinds = {type(v).__name__ if not isinstance(v, dict) else "dict" for v in entries.values()}
    kinds.discard("NoneType")
    enum = any(isinstance(v, dict) and isinstance(v.get("format"), _EnumFormat)
               for v in entries.values())  # fmt: skip
    as_bytes = bool(kinds & {"bytes", "bytearray"})
    package = "skyrl_train" if obj.module.startswith("skyrl_train") else "skyrl"
    if as_bytes:
        enc = "dict pickle, torch.save bytes per tensor"
        return ("skyrl_train 0.1.0-0.3.1" if package == "skyrl_train" else "skyrl (unknown)"), enc
    if obj.rebuilt:
        if enum:
            return f"{package} >= 0.4.0", "_rebuild_tensor_batch, TensorFormat enum"
        return f"{package} 0.2.0-0.3.x", "_rebuild_tensor_batch, format strings"
    enc = "dict pickle, numpy bytes per tensor"
    return ("skyrl 0.1.0" if package == "skyrl" else "skyrl_train after 0.3.1 (git)"), enc


def _load(path: Path, ctx: ReadContext) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """(tensors as numpy arrays, metadata) of one dump; the release noted in `ctx`."""
    require_trust(path, NAME, ctx)
    obj = restricted_load(read_bytes(path), _allowed(), str(path), KNOWN)
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or not isinstance(state.get("batch_dict"), dict):
        raise MismatchError(f"{path}: not a SkyRL training batch (no batch_dict in the pickle)")
    entries = state["batch_dict"]
    release, encoding = release_of(obj, entries)
    ctx.note("release", release)
    ctx.note("pickle", f"{obj.module}: {encoding}")
    tensors = {k: _decode(v, f"{path} field {k}") for k, v in entries.items()}
    meta = state.get("metadata")
    return tensors, dict(meta) if isinstance(meta, dict) else {}


def _decode(value: Any, where: str) -> np.ndarray | None:
    """One batch_dict entry: None, torch.save bytes (skyrl_train), a {"format": ...} dict
    (numpy bytes, a numpy array, torch.save bytes for bf16) or a ragged field (not read)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):  # skyrl_train: torch.save bytes per key
        out = load_torch_zip(bytes(value), where, known=KNOWN)
        return None if out is None else np.asarray(out)
    if isinstance(value, dict):
        fmt = value.get("format", "numpy")
        if fmt == "torch":
            return np.asarray(load_torch_zip(value["data"], where, known=KNOWN))
        if fmt == "numpy":
            return from_bytes(value["data"], as_dtype(value["dtype"], where), value["shape"]).copy()
        if fmt == "numpy_view" and isinstance(value.get("data"), np.ndarray):
            return np.array(value["data"])
        if fmt in ("tensor_list", "packed_tensor"):
            return None  # ragged per-sample fields (images, routed experts): not needed here
    raise MismatchError(f"{where}: unknown tensor encoding {type(value).__name__}")


def _cols(a: np.ndarray) -> str:
    """Column indices as a short list for messages: '0-3,7'."""
    idx = np.flatnonzero(a).tolist()
    if not idx:
        return "none"
    out, s, p = [], idx[0], idx[0]
    for v in [*idx[1:], None]:
        if v is not None and v == p + 1:
            p = v
            continue
        out.append(f"{s}-{p}" if p > s else f"{s}")
        if v is not None:
            s = p = v
    return ",".join(out)


def response_layout(resp: np.ndarray, where: str) -> tuple[str | None, np.ndarray]:
    """(layout, r [B]) from where each row's response_mask ones are: the first r_i columns
    (left-aligned), the last r_i (right-aligned), all R (either: None when every row is
    full or empty). Anything else is refused in one line saying what was found."""
    if resp.ndim != 2:
        raise MismatchError(f"{where}: response_mask has shape {list(resp.shape)}, not [B, R]")
    if not np.isin(resp, (0, 1)).all():
        raise MismatchError(f"{where}: response_mask holds values other than 0 and 1")
    m = resp.astype(bool)
    R = m.shape[1]
    r = m.sum(axis=1)
    col = np.arange(R)[None, :]
    left = (m == (col < r[:, None])).all(axis=1)
    right = (m == (col >= (R - r)[:, None])).all(axis=1)
    bad = np.flatnonzero(~(left | right))
    if bad.size:
        i = int(bad[0])
        raise MismatchError(
            f"{where}: cannot establish the layout: row {i}'s response_mask has {int(r[i])} "
            f"ones at columns {_cols(m[i])} of 0-{R - 1}, neither the first nor the last "
            f"columns ({bad.size} such row(s))"
        )
    partial = (r > 0) & (r < R)
    lefts, rights = np.flatnonzero(partial & left), np.flatnonzero(partial & right)
    if lefts.size and rights.size:
        raise MismatchError(
            f"{where}: cannot establish the layout: response_mask is left-aligned in "
            f"{lefts.size} row(s) (row {lefts[0]}) and right-aligned in {rights.size} (row "
            f"{rights[0]}); a SkyRL batch has one layout"
        )
    layout = LEFT if lefts.size else RIGHT if rights.size else None
    return layout, r


def _check_rows(
    layout: str | None, seq: np.ndarray, att: np.ndarray, r: np.ndarray, R: int, where: str
) -> np.ndarray:
    """Prompt lengths [B] of the rows (r > 0), once attention_mask is seen to mark exactly
    the prompt + response positions `layout` gives; one line when it does not."""
    S = seq.shape[1]
    if not np.isin(att, (0, 1)).all():
        raise MismatchError(f"{where}: attention_mask holds values other than 0 and 1")
    a = att.astype(bool)
    col = np.arange(S)[None, :]
    P = S - R  # left-aligned: the prompt block's width
    if layout == LEFT:
        if P < 0:
            raise MismatchError(
                f"{where}: response_mask is left-aligned but sequences are narrower ({S}) "
                f"than the responses ({R})"
            )
        p = a[:, :P].sum(axis=1)
        expect = ((col >= P - p[:, None]) & (col < P)) | ((col >= P) & (col < P + r[:, None]))
    else:  # right-aligned (or every response fills R: the same columns either way)
        L = a.sum(axis=1)
        p = L - r
        expect = col >= (S - L)[:, None]
    wrong = np.flatnonzero((r > 0) & ((a != expect).any(axis=1) | (p < 0)))
    if wrong.size:
        i = int(wrong[0])
        name = layout or "full-width"
        raise MismatchError(
            f"{where}: response_mask is {name} but attention_mask row {i} marks columns "
            f"{_cols(a[i])} of 0-{S - 1} (its response has {int(r[i])} tokens; {wrong.size} "
            "such row(s)): cannot establish where its tokens are"
        )
    pads = np.unique(seq[(r > 0)[:, None] & ~a])
    if pads.size > 1:
        shown = ", ".join(str(int(v)) for v in pads[:5])
        raise MismatchError(
            f"{where}: the positions attention_mask marks as padding hold {pads.size} "
            f"different token ids ({shown}{', ...' if pads.size > 5 else ''}), not one pad id: "
            "attention_mask does not match sequences"
        )
    return p


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """The rows of one dump (one step): padding rows dropped, empty responses skipped."""
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
    R = resp.shape[1] if resp.ndim == 2 else -1
    for name, a in (("rollout_logprobs", lr), ("action_log_probs", lt), ("loss_mask", loss),
                    ("advantages", adv), ("response_mask", resp)):  # fmt: skip
        if a is not None and a.shape != (B, R):
            raise MismatchError(
                f"{where}: {name} has shape {list(a.shape)}, response_mask {[B, R]} (length mismatch)"
            )
    if att.shape != (B, S):
        raise MismatchError(
            f"{where}: attention_mask has shape {list(att.shape)}, sequences {[B, S]}"
        )
    pad = meta.get("pad_size") or 0
    if not isinstance(pad, int) or not 0 <= pad <= B:
        raise MismatchError(f"{where}: metadata pad_size {pad!r} is not a row count in 0-{B}")
    if loss is not None and pad and (loss[B - pad :] != 0).any():
        raise MismatchError(
            f"{where}: metadata pad_size is {pad} but the last {pad} rows have loss-mask ones "
            "(SkyRL zeroes the loss mask of its DP padding rows)"
        )
    B -= pad  # the last pad_size rows are copies added for the DP split
    seq, att, resp = seq[:B], att[:B], resp[:B]
    layout, r = response_layout(resp, where)
    p = _check_rows(layout, seq, att, r, R, where)
    ctx.note("layout", layout or "full-width (every response fills the response columns)")
    off = resp[:B] == 0
    for name, a in (("loss_mask", loss), ("rollout_logprobs", lr)):
        if a is not None and (a[:B][off] != 0).any():
            i = int(np.flatnonzero((a[:B] != 0) & off)[0] // R)
            raise MismatchError(
                f"{where}: {name} row {i} is non-zero outside the columns response_mask marks "
                f"({layout or 'full-width'}): the tensors do not share one layout"
            )
    empty = int((r == 0).sum())
    if empty:
        ctx.warn(
            f"{where}: {empty} completion(s) with an empty response (response_mask all 0) skipped"
        )
    P = S - R
    prompts, comps, li, ltr, lm, ad, rows = [], [], [], [], [], [], []
    for i in np.flatnonzero(r > 0).tolist():
        n, pi = int(r[i]), int(p[i])
        if layout == LEFT:
            cols, scols, pcols = slice(0, n), slice(P, P + n), slice(P - pi, P)
        else:
            cols, scols, pcols = slice(R - n, R), slice(S - n, S), slice(S - n - pi, S - n)
        rows.append(i)
        prompts.append(seq[i, pcols])
        comps.append(seq[i, scols])
        li.append(lr[i, cols])
        if lt is not None:
            ltr.append(lt[i, cols])
        lm.append(loss[i, cols] > 0 if loss is not None else np.ones(n, bool))
        if adv is not None:
            ad.append(adv[i, cols])
    cat = lambda rows, dt: np.concatenate(rows).astype(dt) if rows else np.zeros(0, dt)  # noqa: E731
    step = step_of(path)
    kept = np.array(rows, np.int64)
    seq_extra: dict[str, np.ndarray] = {"source_row": kept}
    if step is not None:
        seq_extra["step"] = np.full(kept.size, step, np.int64)
    yield Chunk(
        prompt_lens=np.array([len(x) for x in prompts], np.int64),
        prompt_ids=cat(prompts, np.int64),
        lens=r[kept].astype(np.int64),
        token_ids=cat(comps, np.int64),
        logp_infer=cat(li, np.float64),
        loss_mask=cat(lm, bool),
        logp_train=cat(ltr, np.float64) if lt is not None else None,
        token_extra={"advantage": cat(ad, np.float64)} if adv is not None else {},
        seq_extra=seq_extra,
    )
