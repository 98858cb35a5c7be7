"""verl rollout dumps (`skip.rollout`, verl-project/verl @ 1dda039; also the one-file
`actor_rollout_ref.rollout.skip_rollout` dump of volcengine/verl @ b178a3c).

Files: `{skip.rollout.dump_dir}/{experiment}_{project}/GBS.._N.._in.._out../{step}/gen_batch.dp`
with `meta.json` = {"global_steps": step} beside it: a pickle of `DataProto`, whose state
is (batch, non_tensor_batch, meta_info); `batch` is the `torch.save` bytes of a consolidated
TensorDict (or, with VERL_DATAPROTO_SERIALIZATION_METHOD=numpy, a tuple of raw bytes).
Fields, B rows:
    prompts [B, P]             LEFT-padded prompt ids (attention_mask[:, :P] marks them)
    responses [B, R]           right-padded completion, tool / observation tokens included
    response_mask [B, R]       1 = model-generated, 0 = tool, observation or padding
    attention_mask [B, P + R]  1 = real token
    rollout_log_probs [B, R]   inference log-probs (processed), zero-padded
The trainer's log-probs are not in the file: verl imports are always rescored. The step is
meta.json's global_steps (else a numeric folder name). `non_tensor_batch["data_source"]`,
when present, becomes `env`; the row sum of `rm_scores`, when present, `reward`.

Read without verl, tensordict or torch: `pickles.Restricted` maps DataProto to a stand-in
and `pickles.load_torch_zip` rebuilds the consolidated TensorDict with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MismatchError
from .pickles import as_dtype, from_bytes, load_torch_zip, read_bytes, restricted_load
from .toolkit import Chunk, ReadContext, missing, require_trust

NAME = "verl"
PATTERNS = ("gen_batch.dp",)
PICKLE = True
SIDES = "infer"
SIGN = "verl: rollout_log_probs (inference) only; the training side is rescored, delta = logp_infer - logp_train"
_REQUIRED = ("prompts", "responses", "response_mask", "rollout_log_probs")


class _DataProto:
    """Stand-in for verl.protocol.DataProto: keeps the pickled 3-tuple state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def step_of(path: Path) -> int | None:
    """meta.json's global_steps beside the file, else a numeric folder name."""
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            return int(json.loads(meta.read_text())["global_steps"])
        except (ValueError, KeyError, TypeError):
            pass
    return int(path.parent.name) if path.parent.name.isdigit() else None


def load_data_proto(path: Path, ctx: ReadContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as numpy arrays, non_tensor_batch) of one gen_batch.dp."""
    require_trust(path, NAME, ctx)
    where = str(path)
    allowed = {("verl.protocol", "DataProto"): _DataProto, ("torch", "Size"): tuple}
    obj = restricted_load(read_bytes(path), allowed, where)
    state = getattr(obj, "state", None)
    if not isinstance(state, tuple) or len(state) != 3:
        raise MismatchError(f"{where}: not a verl DataProto pickle")
    batch, non_tensor, _meta_info = state
    if isinstance(batch, (bytes, bytearray)):
        td = load_torch_zip(bytes(batch), where)
        if not isinstance(td, dict):
            raise MismatchError(
                f"{where}: the batch is not a consolidated TensorDict (written with tensordict "
                "< 0.5?); re-save it with a recent verl"
            )
    elif isinstance(batch, tuple) and len(batch) == 3:  # VERL_DATAPROTO_SERIALIZATION_METHOD=numpy
        td = {}
        for k, v in batch[2].items():
            if len(v) != 3:
                raise MismatchError(f"{where}: field {k} is a nested tensor (not supported)")
            dtype, shape, data = v
            td[k] = from_bytes(np.asarray(data), as_dtype(dtype, where), shape).copy()
    elif batch is None:
        td = {}
    else:
        raise MismatchError(f"{where}: unknown DataProto batch encoding {type(batch).__name__}")
    return td, dict(non_tensor or {})


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """The rows of one gen_batch.dp (one step)."""
    t, non_tensor = load_data_proto(path, ctx)
    where = str(path)
    absent = [k for k in _REQUIRED if k not in t]
    if absent:
        hint = (
            " (rollout.calculate_log_probs must be on)" if absent == ["rollout_log_probs"] else ""
        )
        raise missing(where, absent, hint)
    prompts, responses, rmask, lr = (t[k] for k in _REQUIRED)
    B, P = prompts.shape
    R = responses.shape[1]
    for name in ("response_mask", "rollout_log_probs"):
        if t[name].shape != (B, R):
            raise MismatchError(
                f"{where}: {name} has shape {list(t[name].shape)}, responses {[B, R]} (length mismatch)"
            )
    att = t.get("attention_mask")
    if att is not None and att.shape != (B, P + R):
        raise MismatchError(
            f"{where}: attention_mask has shape {list(att.shape)}, expected {[B, P + R]}"
        )
    if att is not None:
        pmask = att[:, :P].astype(bool)
        n = att[:, P:].astype(bool).sum(axis=1)  # right-padded: the real tokens come first
    else:  # no attention mask: the response ends at its last model token
        pmask = np.ones((B, P), bool)
        rm = rmask.astype(bool)
        n = np.where(rm.any(axis=1), R - np.argmax(rm[:, ::-1], axis=1), 0)
    cols = np.arange(R)[None, :] < n[:, None]  # [B, R] completion columns
    seq_extra: dict[str, np.ndarray] = {"source_row": np.arange(B, dtype=np.int64)}
    step = step_of(path)
    if step is not None:
        seq_extra["step"] = np.full(B, step, np.int64)
    ds = non_tensor.get("data_source")
    if ds is not None and len(ds) == B:
        seq_extra["env"] = np.asarray([None if v is None else str(v) for v in ds], dtype=object)
    if "rm_scores" in t and t["rm_scores"].shape == (B, R):
        seq_extra["reward"] = t["rm_scores"].astype(np.float64).sum(axis=1)
    yield Chunk(
        prompt_lens=pmask.sum(axis=1).astype(np.int64),
        prompt_ids=prompts[pmask].astype(np.int64),  # row-major: row by row, in order
        lens=n.astype(np.int64),
        token_ids=responses[cols].astype(np.int64),
        logp_infer=lr[cols].astype(np.float64),
        loss_mask=rmask[cols].astype(bool),
        logp_train=None,
        seq_extra=seq_extra,
    )
