"""slime debug dumps (THUDM/slime @ 624b824): `--save-debug-train-data` (both sides) and
`--save-debug-rollout-data` (inference side only); `--dump-details DIR` turns both on, as
DIR/train_data/{rollout_id}.pt and DIR/rollout_data/{rollout_id}.pt.

Each file is a `torch.save` dict holding `rollout_id` (the step) and `samples`, a list of
per-sample dicts:
    train dump (`format_version` 2): tokens (prompt + response ids), response_lengths,
        loss_masks, rollout_log_probs (inference), log_probs (trainer), advantages, rewards
    rollout dump: tokens, response_length, loss_mask (None = all ones), rollout_log_probs,
        reward, status
Per-token fields cover the response only (length response_length); the prompt is
tokens[:-response_length]. loss_mask 0 marks tool / environment tokens. Sign: slime logs
|log_probs - rollout_log_probs|; delta = rollout_log_probs - log_probs.

Loading: torch.load(weights_only=True) (tensors and plain containers only). A dump holding
numpy values too (in metadata) is read, with --trust-pickle, by the restricted torch-free
reader `pickles.load_torch_zip` (tensors, containers, plain numpy arrays and scalars);
anything else (images, arbitrary classes, functions) is refused by name either way. No
load ever runs code from the file: there is no full `torch.load`.
`eval_*.pt` files are evaluation rollouts: skipped in folders. A rollout dump whose
train dump is beside it (../train_data/ with the same name) is skipped: the train dump
holds the same samples with both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MismatchError, first_line
from .pickles import load_torch_zip, read_bytes
from .toolkit import Chunk, ReadContext, missing

NAME = "slime"
PATTERNS = ("*.pt",)
PICKLE = False  # weights_only loading; --trust-pickle also reads numpy values (restricted)
SIDES = "either"
SIGN = "slime: rollout_log_probs (inference), log_probs (trainer); delta = rollout_log_probs - log_probs"


def step_of(path: Path) -> int | None:
    return int(path.stem) if re.fullmatch(r"\d+", path.stem) else None


def select(files: Sequence[Path], warn, explicit: set[Path]) -> list[Path]:
    out, evals, shadowed = [], 0, 0
    for f in files:
        if f.resolve() in explicit:
            out.append(f)
        elif f.stem.startswith("eval_"):
            evals += 1
        elif f.parent.name == "rollout_data" and (f.parent.parent / "train_data" / f.name).exists():
            shadowed += 1
        else:
            out.append(f)
    if evals:
        warn(f"skipped {evals} evaluation dump(s) (eval_*.pt); name them to import them")
    if shadowed:
        warn(f"skipped {shadowed} rollout dump(s) whose train dump (both sides) is imported")
    return out


def _load(path: Path, ctx: ReadContext) -> dict[str, Any]:
    """torch.load with weights_only=True; with --trust-pickle, when that refuses the file,
    the restricted reader that also reads numpy values. Never a full (code-running) load."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = _refused_name(e)
        if not ctx.trust_pickle:
            raise MismatchError(
                f"{path}: torch.load(weights_only=True) refused {what} (the file holds objects "
                "beyond tensors and containers; nothing from it ran); pass --trust-pickle to "
                "also read numpy values (still nothing from the file is run)"
            ) from e
        payload = load_torch_zip(read_bytes(path), str(path))
        ctx.warn(
            f"{path}: holds {what}, beyond tensors: read with the restricted loader "
            "(--trust-pickle; nothing from the file was run)"
        )
    except MismatchError:
        raise
    except Exception as e:  # a damaged or foreign file: one line
        raise MismatchError(f"{path}: not a torch.save file ({first_line(e)[:160]})") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        raise MismatchError(f"{path}: not a slime dump (no `samples` list)")
    return payload


def _refused_name(e: BaseException) -> str:
    """The global or class torch's weights_only unpickler refused, from its message."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"got <class '([\w.]+)'>", str(e))
    return m.group(1) if m else "an object"


def _np(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a tensor
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype).ravel()


def read(path: Path, ctx: ReadContext) -> Iterator[Chunk]:
    """The samples of one dump (one rollout step)."""
    payload = _load(path, ctx)
    samples = payload["samples"]
    where = str(path)
    step = payload.get("rollout_id")
    if step is None:
        step = step_of(path)
    prompts, comps, li, lt, lm, ad, rewards = [], [], [], [], [], [], []
    has_train = None
    for k, s in enumerate(samples):
        w = f"{where} sample {k}"
        rl = s.get("response_lengths", s.get("response_length"))
        need = {
            "tokens": s.get("tokens"),
            "response_length": rl,
            "rollout_log_probs": s.get("rollout_log_probs"),
        }
        absent = [n for n, v in need.items() if v is None]
        if absent:
            raise missing(w, absent, " (is this a slime dump?)")
        tokens = _np(s["tokens"], np.int64)
        R = int(rl)
        if not 0 <= R <= tokens.size:
            raise MismatchError(
                f"{w}: response_length {R} exceeds the {tokens.size} tokens (length mismatch)"
            )
        lr = _np(s["rollout_log_probs"], np.float64)
        mask = s.get("loss_masks", s.get("loss_mask"))
        mask = np.ones(R, bool) if mask is None else _np(mask, np.float64) > 0
        train = s.get("log_probs")
        if has_train is None:
            has_train = train is not None
        elif has_train != (train is not None):
            raise MismatchError(f"{w}: log_probs present in some samples and not in others")
        trn = _np(train, np.float64) if train is not None else None
        for name, a in (("rollout_log_probs", lr), ("loss_mask", mask), ("log_probs", trn)):
            if a is not None and a.size != R:
                raise MismatchError(
                    f"{w}: {name} has {a.size} values for response_length {R} (length mismatch)"
                )
        prompts.append(tokens[: tokens.size - R])
        comps.append(tokens[tokens.size - R :])
        li.append(lr)
        lm.append(mask)
        if trn is not None:
            lt.append(trn)
        adv = s.get("advantages")
        if adv is not None:
            a = _np(adv, np.float64)
            ad.append(a if a.size == R else np.full(R, np.nan))
        rw = s.get("rewards", s.get("reward"))
        rewards.append(float(rw) if isinstance(rw, (int, float)) or hasattr(rw, "item") else np.nan)
    cat = lambda rows, dt: np.concatenate(rows).astype(dt) if rows else np.zeros(0, dt)  # noqa: E731
    S = len(samples)
    seq_extra: dict[str, np.ndarray] = {
        "source_row": np.arange(S, dtype=np.int64),
        "reward": np.asarray(rewards, dtype=np.float64),
    }
    if step is not None:
        seq_extra["step"] = np.full(S, int(step), np.int64)
    yield Chunk(
        prompt_lens=np.array([p.size for p in prompts], np.int64),
        prompt_ids=cat(prompts, np.int64),
        lens=np.array([c.size for c in comps], np.int64),
        token_ids=cat(comps, np.int64),
        logp_infer=cat(li, np.float64),
        loss_mask=cat(lm, bool),
        logp_train=cat(lt, np.float64) if has_train else None,
        token_extra={"advantage": cat(ad, np.float64)} if len(ad) == S and S else {},
        seq_extra=seq_extra,
    )
