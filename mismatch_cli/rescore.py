"""Transformers scoring of token sequences, replaying the sampling settings: the training side
of every run (and the teacher-forced log-probs of `rollout.HfEngine`).

For each generated position t of a completion (prompt c, response y):
    z_t       = logits of the model at the position that predicts y_t            [V]
    processed = `sampling.processed_logits` (temperature, min-p, top-k, top-p)    [V]
    p_t       = softmax(processed), logp_t = log_softmax(processed)              [V]
and we keep per position only what the analysis needs (a few scalars, two top-K lists,
the pruned-mass grid), never the [tokens x V] array: memory grows with the batch only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .dvp import pruned_mass_grids
from .errors import first_line
from .models import input_device
from .sampling import Sampling, processed_logits, processed_logprobs
from .schema import COARSE_COLUMNS, RHO_GRID

# The per-position pass works on [rows, V] slices of the logits. Its peak memory is
# ARRAYS_PER_ROW float32/int32 [rows, V] arrays (the float32 logits, log-probs,
# probabilities and the three int32 arrays of the grids' bins); under top-p the sort of
# `sampling.top_p_drop` (values, int64 indices, cumulative sums) raises it to
# ARRAYS_PER_ROW_TOP_P. Measured with benchmarks/bench_rescore.py --memory (docs/gpu.md).
ARRAYS_PER_ROW = 6
ARRAYS_PER_ROW_TOP_P = 8
# Default byte budget of the pass: this share of the memory free on the logits' device.
DEFAULT_MEMORY_SHARE = 0.25
# ... and at most this much by default: the budget is taken after the weights load but
# before a batch's logits exist, and on a GPU a few hundred rows already fill the device.
DEFAULT_MEMORY_CAP = 2 << 30
# On a CPU, slices larger than this per array run slower (each array pass leaves the caches):
# measured 2x faster at 16-42 rows of a 49k vocabulary than at 256 rows.
CPU_SLICE_BYTES = 8 << 20
# Below this, the "everything else" cell's mass 1 - sum_S is rounding: float32 log-probs
# give it to about 1e-7..2e-5 (the error of a float32 logsumexp, shared by every token of S).
# Where BOTH sides' rest masses are below it, the cell counts as empty on both sides.
REST_FLOOR = 1e-5


def position_stats(
    logp: torch.Tensor,
    tokens: torch.Tensor,
    infer_topk_ids: torch.Tensor,
    infer_topk_logp: torch.Tensor,
    logp_infer: torch.Tensor,
    top_k: int,
    probs: torch.Tensor | None = None,
    *,
    finite: bool = False,
    fused: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position quantities from processed training log-probs.

    logp [n, V] float32 = log_softmax(z); probs [n, V] = softmax(z), the float32 values the
    pruning rules compare (exp(logp) if not given); tokens [n]; infer_topk_ids /
    infer_topk_logp [n, K] (padded with id -1 / -inf); logp_infer [n]. Returns tensors of
    shape [n] or [n, k] / [n, G], including the distribution-level measures of
    `coarse_mismatch` on the partition {inference top-K + sampled token, everything else}.

    `finite`: no truncation set a log-prob to -inf, so the entropy skips a clamp (the same
    numbers; it falls back to the clamp if one was -inf after all). `fused`: the compiled
    entropy-and-grids function of `PositionPass` (equal to float32 rounding), else eager.
    """
    p = logp.exp() if probs is None else probs  # [n, V]; 0 where a truncation set -inf
    logp_train = logp.gather(1, tokens[:, None]).squeeze(1)  # [n]
    p_train = p.gather(1, tokens[:, None]).squeeze(1)  # [n]
    p_max = p.amax(dim=1)  # [n]
    k = min(top_k, logp.shape[1])
    topk = logp.topk(k, dim=1)  # [n, k]
    logp_max = topk.values[:, 0] if k else logp.amax(dim=1)  # [n] the same maximum
    if fused is not None:
        g = torch.tensor(RHO_GRID, dtype=torch.float32, device=p.device)  # [G]
        entropy, mass_minp, mass_abs = fused(p, logp, p_max[:, None] * g, g)
    else:
        entropy = _entropy(p, logp, finite)  # [n]
        mass_minp, mass_abs = pruned_mass_grids(p, RHO_GRID, p_max)  # [n, G] each

    # eps_hat: spread of d_i = logq_i - logp_i over {infer top-K} U {sampled}, both finite.
    ids = torch.cat([infer_topk_ids, tokens[:, None]], dim=1)  # [n, K+1]
    lq = torch.cat([infer_topk_logp, logp_infer[:, None]], dim=1)  # [n, K+1]
    valid_id = ids >= 0
    lp = logp.gather(1, ids.clamp(min=0))  # [n, K+1]
    eps_hat = eps_hat_of(lq, lp, valid_id)  # [n]

    coarse = coarse_mismatch(ids, valid_id, lq, lp)

    return {
        **coarse,
        "logp_train": logp_train,
        "p_train": p_train,
        "logp_max_train": logp_max,
        "p_max_train": p_max,
        "entropy_train": entropy,
        "topk_ids_train": topk.indices.to(torch.int32),
        "topk_logp_train": topk.values,
        "eps_hat": eps_hat,
        "pruned_mass_minp": mass_minp,
        "pruned_mass_abs": mass_abs,
    }


def _entropy(p: torch.Tensor, logp: torch.Tensor, finite: bool) -> torch.Tensor:
    """H = -sum_i p_i log p_i, [n, V] -> [n]; a -inf log-prob (p_i = 0) contributes 0."""
    if finite:
        h = -(p * logp).sum(dim=1)  # [n]
        if not bool(torch.isnan(h).any()):  # 0 * -inf: a -inf after all
            return h
    return -(p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=1)


def _fused_stats(
    p: torch.Tensor, logp: torch.Tensor, thr_minp: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy and both pruned-mass grids in one pass over p, for `torch.compile`: each
    m(rho_g) is a masked sum sum_i p_i [p_i < t_g] (the same tokens as the bins of
    `dvp.pruned_mass_grid`, summed in another order: equal to float32 rounding).
    p, logp [n, V]; thr_minp [n, G] = p_max * grid; grid [G] -> [n], [n, G], [n, G]."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    entropy = _entropy(p, logp, finite=False)  # [n]
    G = thr_minp.shape[1]
    minp = [torch.where(p < thr_minp[:, g : g + 1], p, zero).sum(dim=1) for g in range(G)]
    absolute = [torch.where(p < grid[g], p, zero).sum(dim=1) for g in range(G)]
    return entropy, torch.stack(minp, dim=1), torch.stack(absolute, dim=1)


def eps_hat_of(logq: torch.Tensor, logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Half the spread max_i - min_i of d_i = logq_i - logp_i over the valid ids finite on both
    sides (0 where fewer than two are). logq / logp / valid [n, C] -> [n] float64."""
    d = (logq.double() - logp.double()).masked_fill(~valid, float("nan"))  # [n, C]
    ok = torch.isfinite(d)
    d_max = torch.where(ok, d, torch.full_like(d, -np.inf)).amax(dim=1)  # [n]
    d_min = torch.where(ok, d, torch.full_like(d, np.inf)).amin(dim=1)  # [n]
    return torch.where(ok.sum(dim=1) >= 2, (d_max - d_min) / 2, torch.zeros_like(d_max))


def topk_pair_stats(
    tokens: torch.Tensor,
    q_ids: torch.Tensor,
    q_logp: torch.Tensor,
    q_tok: torch.Tensor,
    p_ids: torch.Tensor,
    p_logp: torch.Tensor,
    p_tok: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """eps_hat and the distribution-level measures for two sides that are both known only
    on their own top-K (two vLLM decodes): the partition is {ids in both top-Ks} U {sampled
    token} plus the rest, a coarser one than `position_stats` uses, and still a lower bound.

    tokens [n]; q_ids / q_logp [n, K] and p_ids / p_logp [n, K'] (-1 / -inf padded); q_tok /
    p_tok [n]: each side's log-prob of the sampled token. Returns eps_hat and the
    COARSE_COLUMNS, each [n]."""
    eq = (q_ids[:, :, None] == p_ids[:, None, :]) & (q_ids[:, :, None] >= 0)  # [n, K, K']
    found = eq.any(dim=2)  # [n, K] q's top-K id is in p's top-K too
    neg_inf = torch.full_like(eq, -np.inf, dtype=p_logp.dtype)
    lp_at = torch.where(eq, p_logp[:, None, :].expand_as(neg_inf), neg_inf).amax(dim=2)  # [n, K]
    ids = torch.cat([q_ids, tokens[:, None]], dim=1)  # [n, K+1]
    lq = torch.cat([q_logp, q_tok[:, None].to(q_logp.dtype)], dim=1)  # [n, K+1]
    lp = torch.cat([lp_at, p_tok[:, None].to(p_logp.dtype)], dim=1)  # [n, K+1]
    valid = torch.cat([found, torch.ones_like(found[:, :1])], dim=1)  # [n, K+1]
    return {"eps_hat": eps_hat_of(lq, lp, valid), **coarse_mismatch(ids, valid, lq, lp)}


def coarse_mismatch(
    ids: torch.Tensor, valid: torch.Tensor, logq: torch.Tensor, logp: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TV and KL both ways between the two sides on the coarse partition of the vocabulary
    into the cells {i} for each i in S = {inference top-K ids} U {sampled token}, plus one
    cell holding everything else (docs/theory.md, "Distribution-level mismatch").

    ids [n, K+1] (the top-K ids, then the sampled token); valid [n, K+1] (False for -1
    padding); logq / logp [n, K+1]: the inference / training log-probs of those ids (-inf = 0).
    The rest cell's masses are q_r = 1 - sum_S q, p_r = 1 - sum_S p (clamped at 0; both set to
    0 where both are below REST_FLOOR). By the data-processing inequality the results are
    lower bounds on the full-vocabulary TV(q, p), KL(q || p) and KL(p || q). A KL is +inf
    where one side gives a cell mass 0 and the other does not (a truncation's kept sets
    differ). Returns tv_coarse, kl_qp_coarse, kl_pq_coarse, each [n] float64.
    """
    K1 = ids.shape[1]
    # the sampled token (last column) is a cell of its own only if it is not in the top-K
    dup = ((ids[:, :-1] == ids[:, -1:]) & valid[:, :-1]).any(dim=1)  # [n]
    cell = valid.clone()  # [n, K+1] distinct ids of S
    cell[:, K1 - 1] &= ~dup
    neg_inf = torch.tensor(-np.inf, dtype=torch.float64, device=ids.device)
    lq = torch.where(cell, logq.double(), neg_inf)  # [n, K+1] log q_i, -inf outside S
    lp = torch.where(cell, logp.double(), neg_inf)  # [n, K+1] log p_i
    q, p = lq.exp(), lp.exp()  # [n, K+1]
    q_r = (1.0 - q.sum(dim=1)).clamp_min(0.0)  # [n] mass of "everything else"
    p_r = (1.0 - p.sum(dim=1)).clamp_min(0.0)  # [n]
    empty = (q_r < REST_FLOOR) & (p_r < REST_FLOOR)  # [n] rest is rounding on both sides
    q_r = torch.where(empty, torch.zeros_like(q_r), q_r)
    p_r = torch.where(empty, torch.zeros_like(p_r), p_r)

    def kl(
        la: torch.Tensor, lb: torch.Tensor, a_r: torch.Tensor, b_r: torch.Tensor
    ) -> torch.Tensor:
        """sum over cells of a log(a / b): 0 where a = 0, +inf where a > 0 = b. -> [n]"""
        a = la.exp()  # [n, K+1]
        cells = torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(dim=1)  # [n]
        rest = torch.where(a_r > 0, a_r * (a_r.log() - b_r.log()), torch.zeros_like(a_r))
        return (cells + rest).clamp_min(0.0)  # >= 0 up to rounding

    tv = 0.5 * ((q - p).abs().sum(dim=1) + (q_r - p_r).abs())  # [n]
    return {
        "tv_coarse": tv,
        "kl_qp_coarse": kl(lq, lp, q_r, p_r),
        "kl_pq_coarse": kl(lp, lq, p_r, q_r),
    }


# How a trainer lays a batch out: right padding (transformers' default, ours), left padding,
# or several sequences packed into one row with position ids restarting at each (no padding).
LAYOUTS = ("right", "left", "packed")


@dataclass(frozen=True)
class TrainNumerics:
    """The training side's numerical choices beyond dtype and attention (diagnose's
    training-side variants; the defaults are what every run does): `head_fp32` the LM head
    and final norm in float32 on a lower-precision model (TRL's `cast_lm_head_to_fp32`,
    `models.cast_head_fp32`); `logsoftmax_dtype` the dtype of the log-softmax (float32, or
    the logits' own bfloat16 / float16); `layout` of a batch (`LAYOUTS`); `tf32` TF32 matmuls
    (CUDA); `batch_invariant` batch-invariant kernels (`batch_invariant_ops`, CUDA)."""

    head_fp32: bool = False
    logsoftmax_dtype: str = "float32"
    layout: str = "right"
    tf32: bool = False
    batch_invariant: bool = False

    def record(self) -> dict[str, Any]:
        """The settings that differ from the default (run.json `engines.train.numerics`)."""
        d, base = asdict(self), asdict(TrainNumerics())
        return {k: v for k, v in d.items() if v != base[k]}

    def context(self) -> Any:
        """A context manager for the forward passes: TF32 matmuls and / or batch-invariant
        kernels switched on inside it, restored after."""
        import contextlib

        stack = contextlib.ExitStack()
        if self.tf32:
            stack.enter_context(_tf32_matmuls())
        if self.batch_invariant:
            from batch_invariant_ops import set_batch_invariant_mode  # CUDA library

            stack.enter_context(set_batch_invariant_mode(True))
        return stack


def _tf32_matmuls() -> Any:
    """TF32 for float32 matmuls and convolutions inside the block (torch's default is off)."""
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Any:
        was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was

    return ctx()


@dataclass
class SeqInput:
    """What rescoring needs of one completion."""

    prompt_token_ids: Sequence[int]
    response_token_ids: Sequence[int]
    topk_ids_infer: np.ndarray  # [T, K] int32, -1 padded
    topk_logp_infer: np.ndarray  # [T, K] float32, -inf padded
    logp_infer: np.ndarray  # [T] float


def make_packed_batches(lengths: Sequence[tuple[int, int]], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices (in order) into packed rows of at most `batch_tokens` tokens
    (the sum of their lengths, no padding); a single long sequence forms its own row."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, (p, t) in enumerate(lengths):
        n = p + max(t - 1, 0)  # the forward's input: prompt + response[:-1]
        if cur and used + n > batch_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def make_batches(lengths: Sequence[tuple[int, int]], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices (sorted by prompt length) so each padded batch stays within
    `batch_tokens` (rows x padded length); a single long sequence forms its own batch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i][0], lengths[i][1]))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = lengths[i][0] + lengths[i][1]
        new_max = max(cur_max, n)
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def forward_logits(
    model: Any, seqs: Sequence[SeqInput], device: torch.device, layout: str = "right"
) -> tuple[torch.Tensor, list[slice]]:
    """One batched forward pass (right padding; `layout` left: left padding with position
    ids from the mask; packed: every sequence in one row, position ids restarting, no
    mask, see `forward_packed`). Returns the logits that predict every response token,
    concatenated over the batch [N_tokens, V], and each sequence's slice."""
    if layout == "packed":
        return forward_packed(model, seqs, device)
    if layout == "left":
        return _forward_left(model, seqs, device)
    _, input_ids, mask = _padded(seqs, left=False)
    L = input_ids.shape[1]
    starts = [len(s.prompt_token_ids) - 1 for s in seqs]  # logits at P-1 predict y_0
    ends = [st + len(s.response_token_ids) for st, s in zip(starts, seqs, strict=True)]
    lo = min(starts)
    # Only the last L - lo positions hold responses: an int `logits_to_keep` (not an index
    # tensor, which would have to live on the device of the last layer's output).
    # Inputs go where the embedding is (the first device of a `device_map`-spread model);
    # the logits come back on the LM head's device, where the per-position work then runs.
    dev = input_device(model, device)
    out = model(
        input_ids=input_ids.to(dev),
        attention_mask=mask.to(dev),
        logits_to_keep=L - lo,
        use_cache=False,
    )
    logits = out.logits  # [B, L - lo, V]
    return _gathered(
        logits, [st - lo for st in starts], [e - st for st, e in zip(starts, ends, strict=True)]
    )


def _forward_left(
    model: Any, seqs: Sequence[SeqInput], device: torch.device
) -> tuple[torch.Tensor, list[slice]]:
    """`forward_logits` with left padding: each row's tokens end at column L; position ids
    count from 0 at each row's first real token (cumsum of the mask), as in generation."""
    full, input_ids, mask = _padded(seqs, left=True)
    L = input_ids.shape[1]
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # [B, L]
    dev = input_device(model, device)
    out = model(
        input_ids=input_ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=position_ids.to(dev),
        use_cache=False,
    )
    logits = out.logits  # [B, L, V]
    # row i's first token sits at column L - len(full[i]); logits at P-1 predict y_0
    starts = [L - len(f) + len(s.prompt_token_ids) - 1 for f, s in zip(full, seqs, strict=True)]
    return _gathered(logits, starts, [len(s.response_token_ids) for s in seqs])


def _padded(
    seqs: Sequence[SeqInput], left: bool
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """The batch's inputs (prompt + response but its last token) padded to one length, on
    the right or the left: the token lists, input ids [B, L] and attention mask [B, L]."""
    full = [list(s.prompt_token_ids) + list(s.response_token_ids)[:-1] for s in seqs]
    L = max(len(f) for f in full)
    input_ids = torch.zeros(len(full), L, dtype=torch.long)
    mask = torch.zeros(len(full), L, dtype=torch.long)
    for i, f in enumerate(full):
        cols = slice(L - len(f), L) if left else slice(0, len(f))
        input_ids[i, cols] = torch.tensor(f, dtype=torch.long)
        mask[i, cols] = 1
    return full, input_ids, mask


def _gathered(
    logits: torch.Tensor, starts: Sequence[int], lengths: Sequence[int]
) -> tuple[torch.Tensor, list[slice]]:
    """Row i's logits [starts[i], starts[i] + lengths[i]) of [B, L, V], concatenated
    [N_tokens, V], and each row's slice of the result."""
    rows, slices, n = [], [], 0
    for i, (st, t) in enumerate(zip(starts, lengths, strict=True)):
        rows.append(logits[i, st : st + t])
        slices.append(slice(n, n + t))
        n += t
    return torch.cat(rows, dim=0), slices


def forward_packed(
    model: Any, seqs: Sequence[SeqInput], device: torch.device
) -> tuple[torch.Tensor, list[slice]]:
    """Every sequence of the batch in ONE row, as trainers pack: input ids concatenated,
    position ids restarting at 0 for each sequence, no attention mask (transformers then
    builds a block-causal mask from the position ids: `masking_utils.
    find_packed_sequence_indices`, so no sequence attends to another). Returns what
    `forward_logits` returns."""
    full = [list(s.prompt_token_ids) + list(s.response_token_ids)[:-1] for s in seqs]
    ids = torch.tensor([t for f in full for t in f], dtype=torch.long)[None]  # [1, L]
    pos = torch.cat([torch.arange(len(f)) for f in full])[None]  # [1, L] restarting
    dev = input_device(model, device)
    out = model(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=False)
    logits = out.logits[0]  # [L, V]
    rows, slices, n, at = [], [], 0, 0
    for f, s in zip(full, seqs, strict=True):
        st = at + len(s.prompt_token_ids) - 1
        t = len(s.response_token_ids)
        rows.append(logits[st : st + t])
        slices.append(slice(n, n + t))
        n += t
        at += len(f)
    return torch.cat(rows, dim=0), slices


@torch.inference_mode()
def score_sequences(
    model: Any,
    seqs: Sequence[SeqInput],
    sampling: Sampling,
    top_k: int,
    device: torch.device,
    batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
    plan: PositionPass | None = None,
    numerics: TrainNumerics | None = None,
) -> list[dict[str, np.ndarray]]:
    """Score every response token of `seqs` on the training side, batched.

    Returns, per sequence, a dict of numpy arrays with one row per response token.
    `on_batch(n_tokens)` is called after each forward pass (progress bars). `plan`: rows per
    slice of the per-position pass and whether it is compiled (default: `plan_pass` with
    the default budget, eager). `numerics`: the batch layout, the log-softmax dtype and the
    kernels' modes (`TrainNumerics`; the head's dtype is the loaded model's).
    """
    if plan is None:
        plan = plan_pass(model, sampling)
    num = numerics or TrainNumerics()
    results: list[dict[str, np.ndarray] | None] = [None] * len(seqs)
    lengths = [(len(s.prompt_token_ids), len(s.response_token_ids)) for s in seqs]
    batcher = make_packed_batches if num.layout == "packed" else make_batches
    with num.context():
        _score_batches(model, seqs, sampling, top_k, device, batcher(lengths, batch_tokens),
                       results, on_batch, plan, num)  # fmt: skip
    return [r for r in results if r is not None]


def _score_batches(
    model: Any,
    seqs: Sequence[SeqInput],
    sampling: Sampling,
    top_k: int,
    device: torch.device,
    batches: list[list[int]],
    results: list[dict[str, np.ndarray] | None],
    on_batch: Callable[[int], None] | None,
    plan: PositionPass,
    num: TrainNumerics,
) -> None:
    """`score_sequences`' loop: one forward and one per-position pass per batch, each
    sequence's rows into `results`."""
    for batch in batches:
        bseqs = [seqs[i] for i in batch]
        if not any(len(s.response_token_ids) for s in bseqs):  # nothing to score
            for i in batch:
                results[i] = _empty_result(top_k, min(top_k, model.config.vocab_size))
            continue
        logits, slices = forward_logits(model, bseqs, device, num.layout)  # [N, V]
        dev = logits.device  # per-position work stays on the device; only results move
        tokens = _cat([s.response_token_ids for s in bseqs], torch.long).to(dev)
        ids_q = _cat([s.topk_ids_infer for s in bseqs], torch.long, 2).to(dev)
        lq_topk = _cat([s.topk_logp_infer for s in bseqs], torch.float32, 2).to(dev)
        lq = _cat([s.logp_infer for s in bseqs], torch.float32).to(dev)
        merged = score_logits(
            logits, tokens, ids_q, lq_topk, lq, sampling, top_k, plan, num.logsoftmax_dtype
        )
        arrays = {k: v.numpy() for k, v in merged.items()}
        for j, i in enumerate(batch):
            results[i] = {k: v[slices[j]] for k, v in arrays.items()}
        if on_batch is not None:
            on_batch(int(logits.shape[0]))
        del logits


def score_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    ids_q: torch.Tensor,
    lq_topk: torch.Tensor,
    lq: torch.Tensor,
    sampling: Sampling,
    top_k: int,
    plan: PositionPass,
    logsoftmax_dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """The per-position pass over a batch's logits, `plan.rows` rows at a time (its memory
    bound): the sampling replayed, then `position_stats`. logits [N, V] (any float dtype);
    tokens [N]; ids_q / lq_topk [N, K]; lq [N], on the logits' device. Returns the
    `position_stats` columns [N, ...] on the CPU. `logsoftmax_dtype`: the dtype the
    (log-)softmax is computed in (float32 by default; `bfloat16` is what a trainer computing
    it in its logits' own dtype gets: the processed logits rounded to it, the log-probs
    rounded too, then widened to float32 for the statistics)."""
    N = logits.shape[0]
    merged: dict[str, torch.Tensor] = {}
    low = None if logsoftmax_dtype == "float32" else getattr(torch, logsoftmax_dtype)
    for r in range(0, N, plan.rows):
        sl = slice(r, r + plan.rows)
        z = processed_logits(logits[sl], sampling)  # [n, V] float32
        if low is None:
            logp, probs = torch.log_softmax(z, dim=-1), torch.softmax(z, dim=-1)
        else:  # [n, V] computed in `low`, widened exactly
            zl = z.to(low)
            logp = torch.log_softmax(zl, dim=-1).float()
            probs = torch.softmax(zl, dim=-1).float()
            del zl
        del z
        st = position_stats(
            logp, tokens[sl], ids_q[sl], lq_topk[sl], lq[sl], top_k, probs,
            finite=not sampling.truncates, fused=plan.fused(),
        )  # fmt: skip
        for k, v in st.items():  # results go to the CPU slice by slice, into one array
            if k not in merged:
                merged[k] = torch.empty((N, *v.shape[1:]), dtype=v.dtype)
            merged[k][sl] = v
    return merged


# ----------------------------------------------------------------------------- the pass's plan

COMPILE_ENV = "MISMATCH_COMPILE"
# `auto` compiles the per-position pass on a CPU when at least this many positions are to be
# scored: where the time it saves (measured ~0.3 ms per position at a 49k vocabulary) covers
# the one-time compilation (~5 s from inductor's cache, ~30 s without), see docs/gpu.md.
COMPILE_MIN_ROWS = 100_000


@dataclass
class PositionPass:
    """How the per-position pass runs: `rows` of the [rows, V] logits at a time, chosen so
    that its temporaries (`bytes_per_row` each row) stay within `budget_bytes`; `compiled`:
    entropy and the grids run through `torch.compile` (a failure falls back to eager with
    one warning, through `warn`)."""

    rows: int
    budget_bytes: int
    bytes_per_row: int
    budget_source: str
    compiled: bool = False
    warn: Callable[[str], None] | None = None
    _fn: Any = None

    def fused(self) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """The compiled `_fused_stats` (with a fallback), or None for the eager pass."""
        if not self.compiled:
            return None
        if self._fn is None:
            self._fn = _compiled_stats(self)
        return self._fn

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the plan (`engines.train.per_position`)."""
        d = asdict(self)
        return {k: d[k] for k in ("rows", "budget_bytes", "bytes_per_row", "budget_source",
                                  "compiled")}  # fmt: skip


def bytes_per_row(vocab: int, sampling: Sampling) -> int:
    """Peak bytes of the per-position pass per row of the logits (4-byte [V] arrays)."""
    arrays = ARRAYS_PER_ROW_TOP_P if sampling.top_p < 1.0 else ARRAYS_PER_ROW
    return arrays * 4 * vocab


def rows_for_budget(vocab: int, sampling: Sampling, budget: int, device: Any = None) -> int:
    """Rows per slice: as many as `budget` bytes allow (at least one), and on a CPU no more
    than keep one float32 array near CPU_SLICE_BYTES (cache-sized slices run faster)."""
    rows = max(1, budget // bytes_per_row(vocab, sampling))
    if torch.device(device or "cpu").type != "cuda":
        rows = min(rows, max(1, CPU_SLICE_BYTES // (4 * vocab)))
    return int(rows)


def free_memory(device: Any = None) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory, else the system's
    available memory (/proc/meminfo's MemAvailable, else free pages from os.sysconf)."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # unknown: assume 4 GiB free


def output_device(model: Any, default: Any = None) -> Any:
    """The device the logits come out on: the LM head's (the last device of a `device_map`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return default


def plan_pass(
    model: Any,
    sampling: Sampling,
    memory: int | None = None,
    total_rows: int = 0,
    warn: Callable[[str], None] | None = None,
) -> PositionPass:
    """The per-position pass for `model`: the byte budget is `memory` (`--rescore-memory`)
    or DEFAULT_MEMORY_SHARE of the memory free on the logits' device, at most
    DEFAULT_MEMORY_CAP; compiled per
    `MISMATCH_COMPILE` (`auto`: on a CPU for at least COMPILE_MIN_ROWS rows; `1` / `0`)."""
    vocab = int(model.config.vocab_size)
    dev = torch.device(output_device(model, "cpu"))
    if memory is None:
        budget = min(int(DEFAULT_MEMORY_SHARE * free_memory(dev)), DEFAULT_MEMORY_CAP)
        source = (
            f"{DEFAULT_MEMORY_SHARE:.0%} of the memory free on {dev.type}, "
            f"at most {DEFAULT_MEMORY_CAP >> 30} GiB"
        )
    else:
        budget, source = int(memory), "--rescore-memory"
    return PositionPass(
        rows=rows_for_budget(vocab, sampling, budget, dev),
        budget_bytes=budget,
        bytes_per_row=bytes_per_row(vocab, sampling),
        budget_source=source,
        compiled=compile_wanted(dev, total_rows),
        warn=warn,
    )


def compile_wanted(device: Any, total_rows: int) -> bool:
    """`MISMATCH_COMPILE`: `1`/`on` compiles, `0`/`off` does not, `auto` (default) compiles
    on a CPU for at least COMPILE_MIN_ROWS rows (not measured on a GPU: off there)."""
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if mode in ("1", "on", "true", "yes"):
        return True
    if mode in ("0", "off", "false", "no"):
        return False
    return torch.device(device).type == "cpu" and total_rows >= COMPILE_MIN_ROWS


def _compiled_stats(plan: PositionPass) -> Callable[..., tuple[torch.Tensor, ...]]:
    """`_fused_stats` through torch.compile, its kernels cached across processes (inductor's
    cache, under the tool's cache folder unless TORCHINDUCTOR_CACHE_DIR is set). The first
    failure (no compiler, an inductor bug) warns once and turns the plan eager."""
    from .models import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    compiled = torch.compile(_fused_stats, dynamic=True)

    def run(p: torch.Tensor, logp: torch.Tensor, thr: torch.Tensor, g: torch.Tensor):
        if p.shape[0] == 1:  # one row would be compiled again (size 1 is specialised)
            out = run(p.expand(2, -1).contiguous(), logp.expand(2, -1).contiguous(),
                      thr.expand(2, -1).contiguous(), g)  # fmt: skip
            return tuple(o[:1] for o in out)
        if plan.compiled:
            try:
                return compiled(p, logp, thr, g)
            except Exception as e:  # any compile failure: eager instead
                plan.compiled = False
                if plan.warn is not None:
                    why = first_line(e)
                    plan.warn(f"torch.compile of the per-position pass failed ({why}); eager")
        entropy = _entropy(p, logp, finite=False)
        return (entropy, *pruned_mass_grids(p, RHO_GRID, p.amax(dim=1)))

    return run


def _cat(arrays: Sequence[Any], dtype: torch.dtype, ndim: int = 1) -> torch.Tensor:
    """Concatenate per-sequence arrays (possibly read-only, from Parquet) into one tensor.

    np.array copies, so torch never wraps a non-writable buffer (no "NumPy array is not
    writable" warning); empty rows keep their trailing shape."""
    rows = [np.array(a) for a in arrays]
    if ndim == 2:
        k = max((r.shape[1] for r in rows if r.ndim == 2 and r.size), default=0)
        rows = [r.reshape(len(r), k) if r.size == 0 else r for r in rows]
    return torch.from_numpy(np.concatenate(rows)).to(dtype)


_GRID_KEYS = ("pruned_mass_minp", "pruned_mass_abs")


def _empty_result(top_k: int, k: int) -> dict[str, np.ndarray]:
    """The per-position arrays of a sequence with no response token."""
    out: dict[str, np.ndarray] = {
        key: np.zeros(0, dtype=np.float32)
        for key in ("logp_train", "p_train", "logp_max_train", "p_max_train", "entropy_train")
    }
    for key in ("eps_hat", *COARSE_COLUMNS):
        out[key] = np.zeros(0, dtype=np.float64)
    out["topk_ids_train"] = np.zeros((0, k), dtype=np.int32)
    out["topk_logp_train"] = np.zeros((0, k), dtype=np.float32)
    for key in _GRID_KEYS:
        out[key] = np.zeros((0, len(RHO_GRID)), dtype=np.float32)
    return out


__all__ = [
    "LAYOUTS",
    "PositionPass",
    "Sampling",
    "SeqInput",
    "TrainNumerics",
    "coarse_mismatch",
    "eps_hat_of",
    "forward_logits",
    "forward_packed",
    "make_batches",
    "make_packed_batches",
    "plan_pass",
    "position_stats",
    "processed_logprobs",
    "score_logits",
    "score_sequences",
    "topk_pair_stats",
]
