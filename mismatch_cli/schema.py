"""The run-directory contract: file names, column names, grids and conventions.

Every module that writes or reads a run imports its names from here, so a column
is called the same thing in the writer, the analysis, the plots and the docs.
"""

from __future__ import annotations

FORMAT_VERSION = 1

RUN_JSON = "run.json"
DIAGNOSE_JSON = "diagnose.json"  # a `mismatch diagnose` directory: its variants and result
REPORT_HTML = "report.html"  # the report page (`report --html`; measure, demo, import, diagnose)
TOKENS_FILE = "tokens.parquet"
SEQUENCES_FILE = "sequences.parquet"
PARTS_DIR = "parts"  # per-chunk Parquet files of an incomplete run (resume state)

STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"

# The pruning-threshold grid shared by the min-p rule (rho) and the absolute rule (tau):
# a 1-2-5 log-spaced grid from 1e-8 to 0.5 (24 values). `measure` stores the
# training-side pruned mass at every value, per position, so `sweep-threshold`
# never has to rerun a model.
RHO_GRID: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-8, 0) for m in (1, 2, 5))

# Conventions recorded in every run.json and repeated in --help and docs.
CONVENTIONS: dict[str, str] = {
    "delta": "delta = logp_infer - logp_train (nats, natural log)",
    "ratio": "importance ratio r_t = p_train / p_infer = exp(-delta) (rho is the pruning threshold)",
    "logprobs": (
        "both sides are log-probs of the SAMPLING distribution: temperature, then "
        "top-k / top-p / min-p truncation with renormalisation (vLLM processed_logprobs; "
        "the training side replays the same settings on its own logits)"
    ),
    "bucket_policy": "buckets and (1 - p) use the training-side probability p_train unless stated",
    "pruned_mass": (
        "pruned mass m(rho) = training-side probability outside the safe set, computed on "
        "the training-side sampling distribution (after temperature and truncation)"
    ),
    "min_p_rule": (
        "vLLM's: keep token i iff p_i >= float32(rho) * max_j p_j on float32 softmax "
        "probabilities; the replay, dvp and sweep-threshold all use it"
    ),
    "eps_hat": (
        "per position: half the spread max_i - min_i of (logp_infer_i - logp_train_i) over "
        "the inference top-K tokens and the sampled token that both sides keep; a lower bound "
        "on eps = max_i |logit perturbation_i|"
    ),
    "infinite_delta": (
        "a sampled token (kept by the inference side, which sampled it) that the training "
        "side's replayed truncation prunes has logp_train = -inf and delta = +inf; it is "
        "counted (kept_train == False) and excluded from means"
    ),
}

# tokens.parquet: one row per generated token.
TOKEN_COLUMNS: dict[str, str] = {
    "seq_id": "int64: completion id (unique in the run)",
    "prompt_id": "int64: index of the prompt in the prompt set",
    "sample_idx": "int32: index of the sample for this prompt",
    "pos": "int32: 0-based position in the completion",
    "token_id": "int32: sampled token",
    "logp_infer": "float64: inference-side (vLLM) log-prob of the sampled token, nats",
    "logp_train": "float64: training-side (transformers) log-prob of the sampled token, nats",
    "delta": "float64: logp_infer - logp_train, nats (+inf if the training side prunes the token)",
    "p_infer": "float64: exp(logp_infer)",
    "p_train": "float64: training-side probability of the sampled token (the float32 softmax value the pruning rule compares)",
    "p_max_train": "float64: largest training-side probability at this position (float32 softmax value)",
    "logp_max_train": "float64: log-prob of the most likely token on the training side",
    "entropy_train": "float64: entropy of the training-side sampling distribution, nats",
    "eps_hat": "float64: per-position lower bound on the logit perturbation eps, nats",
    "kept_train": "bool: the training side's truncation keeps the sampled token",
    "topk_ids_infer": "list<int32>: inference-side top-K token ids",
    "topk_logp_infer": "list<float32>: their inference-side log-probs",
    "topk_ids_train": "list<int32>: training-side top-K token ids",
    "topk_logp_train": "list<float32>: their training-side log-probs",
    "pruned_mass_minp": "list<float32>: training-side pruned mass at each RHO_GRID value, min-p rule",
    "pruned_mass_abs": "list<float32>: training-side pruned mass at each RHO_GRID value, absolute rule",
    "tv_coarse": "float64: total variation between the two sides on the partition {inference top-K + sampled token, rest}; a lower bound on the full-vocabulary TV (optional: runs before it lack it)",
    "kl_qp_coarse": "float64: KL(q || p) (inference || training) on that partition; a lower bound on the full KL; +inf where a cell has mass 0 on the training side only (optional)",
    "kl_pq_coarse": "float64: KL(p || q) (training || inference) on that partition; a lower bound on the full KL; +inf where a cell has mass 0 on the inference side only (optional)",
}

# The distribution-level columns (`rescore.coarse_mismatch`), optional when read.
COARSE_COLUMNS: tuple[str, ...] = ("tv_coarse", "kl_qp_coarse", "kl_pq_coarse")

# Optional token columns (imported runs): carried from a rollout part onto its token rows
# by `pipeline.rescore_parts` (a list per completion -> one value per token; a scalar per
# completion -> repeated). Readers treat every one of them as optional.
TOKEN_EXTRA_COLUMNS: dict[str, str] = {
    "step": "int64: training step of the rollout (imported runs)",
    "env": "string: environment / task name (imported runs)",
    "turn": "int32: turn index in a multi-turn completion (imported runs)",
    "advantage": "float64: the trainer's advantage for this token (imported runs)",
}

# sequences.parquet: one row per completion.
SEQUENCE_COLUMNS: dict[str, str] = {
    "seq_id": "int64",
    "prompt_id": "int64",
    "sample_idx": "int32",
    "prompt_token_ids": "list<int32>: the exact prompt tokens sent to the engine",
    "response_token_ids": "list<int32>: the sampled completion tokens",
    "num_tokens": "int32: token rows of the completion (its length for measured runs)",
    "sum_delta": "float64: sum over the completion of delta (+inf / -inf if a token is; NaN if it holds both; 0 only without token rows)",
    "logp_infer_sum": "float64: sum of logp_infer",
    "logp_train_sum": "float64: sum of logp_train",
    "finish_reason": "string: 'stop' or 'length'",
    "text": "string: decoded completion",
}

# Optional sequence columns of imported runs (`mismatch import`); readers treat them as optional.
SEQUENCE_EXTRA_COLUMNS: dict[str, str] = {
    "num_dropped_tokens": "int32: completion tokens with loss_mask 0 (tool / observation tokens): no token rows",
    "step": "int64: training step of the rollout",
    "env": "string: environment / task name",
    "reward": "float64: the completion's reward, where the dump has one",
    "source_file": "int32: index of the file in run.json's source.files",
    "source_row": "int64: record (prime-rl, tokens) or batch row (slime, SkyRL, verl) in that file",
}
