"""Inference side: generate completions with per-token log-probs of the sampling distribution.

Two engines:
- `vllm` (default): vLLM with `logprobs_mode="processed_logprobs"`, so the returned log-probs
  are those of the distribution the tokens were sampled from (after temperature and
  truncation), with the top-K alternatives at every position.
- `hf`: transformers `generate` with the same sampling rules (vLLM's order), then the
  log-probs from a teacher-forced forward pass in `--infer-dtype` through the same code as
  the training side. With equal dtypes the two sides are then bit-identical: the null check
  that proves the pipeline is wired correctly (positions, prompts, replayed sampling).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .config import MeasureConfig
from .errors import MismatchError, first_line

# One record per completion, the columns of a `rollout` part file.
Record = dict[str, Any]


class CallbackTqdm:
    """The slice of tqdm's interface vLLM's `LLM.generate(use_tqdm=...)` uses, over a callback.

    vLLM calls update(n) with the number of finished completions of each request. It also
    wraps the iterable of requests it adds (``tqdm_func(iterable, ...)``): that pass is silent.
    """

    def __init__(self, advance: Callable[[int], None], iterable: Any = None, **_: Any) -> None:
        import time

        self._iterable = iterable
        self._advance = advance
        self._t0 = time.monotonic()
        self.n = 0
        self.postfix = ""

    @property
    def format_dict(self) -> dict[str, float]:
        import time

        return {"elapsed": max(time.monotonic() - self._t0, 1e-9)}

    def __iter__(self) -> Any:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        self.n += n
        self._advance(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def vllm_engine_kwargs(model_path: str, cfg: MeasureConfig) -> dict[str, Any]:
    """The arguments of `vllm.LLM(...)` for a run: the settings `measure` owns, the
    parallelism (tensor and pipeline; vLLM's Ray backend spans nodes), then `--engine-arg`s."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": cfg.infer_dtype,
        "seed": cfg.seed,
        "max_logprobs": cfg.top_logprobs,
        "logprobs_mode": "processed_logprobs",
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "enforce_eager": cfg.enforce_eager,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "use_tqdm_on_load": False,  # our own progress lines say what is happening
    }
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if not _cuda_available():
        kwargs.update(cpu_prefill_args(model_path, cfg.max_model_len))
    kwargs.update(cfg.engine_args)
    return kwargs


class VllmEngine:
    """vLLM generation with processed (sampling-distribution) log-probs."""

    def __init__(self, model_path: str, cfg: MeasureConfig) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # vLLM logs every engine setting at INFO and CPU performance hints at WARNING; keep
        # the terminal for our progress (set VLLM_LOGGING_LEVEL=WARNING or INFO to see them).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        # the engine processes import modules that raise FutureWarnings on import
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
        # ... and on stderr: stdout carries results (`--json` must stay parseable)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        # vLLM's CPU build keeps one core for its front-end by default; on a small machine
        # binding the worker to every core roughly doubled bf16 decoding here (20 -> 37 tok/s
        # on 2 cores). Set VLLM_CPU_OMP_THREADS_BIND yourself to override.
        if not _cuda_available() and os.cpu_count():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        if not _cuda_available():
            # vLLM gives one engine step 300 s before it declares the engine dead; a whole
            # prefill of a chunk with prompt log-probs (thousands of tokens x the vocabulary)
            # on a loaded 2-core CPU took longer (diagnose's prefill-bf16 died that way). A
            # CPU step that slow is slow, not hung: allow an hour.
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
            # reuse the compiled model vLLM cached on an earlier start instead of compiling
            # it again (35-55 s a start here): mismatch_cli/vllm_plugin.py says why
            from .vllm_plugin import ENV as AOT_LOAD_ENV

            os.environ.setdefault(AOT_LOAD_ENV, "1")
        from vllm import LLM

        kwargs = vllm_engine_kwargs(model_path, cfg)
        self.cfg = cfg
        from .models import check_vllm_supports

        check_vllm_supports(model_path)
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, TypeError) as e:  # bad engine argument, dtype, length, device
            raise MismatchError(f"vLLM could not start: {first_line(e)}") from e

    def sampling_params(self, prompt_id: int) -> Any:
        from vllm import SamplingParams

        c = self.cfg
        return SamplingParams(
            n=c.samples_per_prompt,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k if c.top_k > 0 else 0,
            min_p=c.min_p,
            max_tokens=c.max_tokens,
            logprobs=c.top_logprobs,
            # vLLM seeds sample j of a request with seed + j: space prompts apart so no two
            # samples of the run share a seed (and results do not depend on the chunking)
            seed=c.seed + prompt_id * c.samples_per_prompt,
        )

    def generate(
        self, prompts: Sequence[tuple[int, list[int]]], advance: Callable[[int], None]
    ) -> list[Record]:
        """Generate `samples_per_prompt` completions for each (prompt_id, token ids)."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=ids) for _, ids in prompts]
        params = [self.sampling_params(pid) for pid, _ in prompts]
        try:
            outs = self.llm.generate(
                inputs, params, use_tqdm=lambda *a, **kw: CallbackTqdm(advance, *a, **kw)
            )
        except ValueError as e:  # e.g. a prompt longer than the model's context
            raise MismatchError(f"vLLM refused the request: {first_line(e)}") from e
        except Exception as e:  # the engine process died (its log above names the cause)
            if type(e).__name__ != "EngineDeadError":
                raise
            raise MismatchError(
                "vLLM's engine died while generating (the cause is in vLLM's log above; "
                "a model this vLLM build cannot run can still be measured with --infer-engine hf)"
            ) from e
        records: list[Record] = []
        K = self.cfg.top_logprobs
        for (pid, ids), out in zip(prompts, outs, strict=True):
            for j, comp in enumerate(out.outputs):
                toks = list(comp.token_ids)
                lp, top_ids, top_lp = _logprob_rows(toks, comp.logprobs or [], K)
                records.append(
                    _record(pid, j, ids, toks, lp, top_ids, top_lp, comp.finish_reason, comp.text)
                )
        return records

    def prefill_logprobs(
        self,
        seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
        advance: Callable[[int], None],
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Score stored (prompt, response) token sequences in one prefill pass each:
        `SamplingParams(max_tokens=1, prompt_logprobs=K)` on prompt + response.

        vLLM 0.32 computes prompt log-probs as a raw log-softmax of the logits (no
        temperature, no top-k / top-p / min-p, whatever `logprobs_mode` says:
        gpu_model_runner._get_prompt_logprobs_dict), and requests asking for them skip the
        prefix cache. Per sequence: (logp [T] of each response token, top-K ids [T, K]
        (-1 padded), their log-probs [T, K] (-inf padded)); empty responses are not sent."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        K = self.cfg.top_logprobs
        todo = [i for i, (_, y) in enumerate(seqs) if len(y)]
        # no seed: vLLM 0.32's CPU runner crashes on a seeded request whose prefill is chunked
        # ("CPU Generator does not use offset"), and the one sampled token is discarded anyway
        params = SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False)
        inputs = [
            TokensPrompt(prompt_token_ids=np.concatenate([seqs[i][0], seqs[i][1]]).tolist())
            for i in todo
        ]  # Python ints: vLLM's request serialiser refuses numpy scalars
        try:
            outs = self.llm.generate(
                inputs, params, use_tqdm=lambda *a, **kw: CallbackTqdm(advance, *a, **kw)
            )
        except ValueError as e:  # e.g. a sequence longer than the model's context
            raise MismatchError(f"vLLM refused the request: {first_line(e)}") from e
        empty = (np.zeros(0), np.zeros((0, K), np.int32), np.zeros((0, K), np.float32))
        result: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [empty] * len(seqs)
        for i, out in zip(todo, outs, strict=True):
            P, y = len(seqs[i][0]), np.asarray(seqs[i][1]).tolist()
            result[i] = _logprob_rows(y, (out.prompt_logprobs or [])[P : P + len(y)], K)
        return result

    def close(self) -> None:
        """Shut the engine process down explicitly (frees memory before rescoring)."""
        try:
            engine = getattr(self.llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # best effort: the process is going away anyway
            pass
        del self.llm
        import gc

        gc.collect()


def cpu_prefill_args(model_path: str, max_model_len: int | None) -> dict[str, Any]:
    """Engine settings that keep vLLM's CPU build from chunking a prefill.

    A chunked prefill samples a token it then discards, and vLLM rewinds the request's
    seeded generator (`gen.set_offset`), which a CPU torch.Generator refuses ("CPU Generator
    does not use offset"): the engine dies as soon as a chunk's prompts exceed the step's
    token budget (4096 on CPU; e.g. 64 prompts x 4 samples). Whole prefills need a budget of
    at least the context length. --engine-arg overrides either setting."""
    import json
    from pathlib import Path

    length = max_model_len
    cfg_file = Path(model_path) / "config.json"
    if length is None and cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)  # multimodal wrappers keep the LM's settings inside
        keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
        found = [int(c[k]) for k in keys if isinstance(c.get(k), int)]
        factor = (c.get("rope_scaling") or {}).get("factor") or 1
        length = int(max(found) * max(float(factor), 1.0)) if found else None
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(length or 32768, 4096)}


def _logprob_rows(
    toks: Sequence[int], dicts: Sequence[Any], K: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's per-position log-prob dicts {token id: Logprob} -> (logp [T] of each token in
    `toks`, top-K ids [T, K] by rank (-1 padded), their log-probs [T, K] (-inf padded))."""
    T = len(toks)
    top_ids = np.full((T, K), -1, dtype=np.int32)
    top_lp = np.full((T, K), -np.inf, dtype=np.float32)
    lp = np.empty(T, dtype=np.float64)
    for t, (tok, d) in enumerate(zip(toks, dicts, strict=True)):
        lp[t] = d[tok].logprob
        ranked = sorted(
            ((v.rank, k, v.logprob) for k, v in d.items() if v.rank is not None),
            key=lambda x: x[0],
        )[:K]
        for r, (_, k, v) in enumerate(ranked):
            top_ids[t, r] = k
            top_lp[t, r] = v
    return lp, top_ids, top_lp


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _record(
    prompt_id: int,
    sample_idx: int,
    prompt_ids: Sequence[int],
    toks: Sequence[int],
    logp: np.ndarray,
    top_ids: np.ndarray,
    top_lp: np.ndarray,
    finish_reason: str | None,
    text: str,
) -> Record:
    return {
        "prompt_id": int(prompt_id),
        "sample_idx": int(sample_idx),
        "prompt_token_ids": np.asarray(prompt_ids, dtype=np.int32),
        "response_token_ids": np.asarray(toks, dtype=np.int32),
        "logp_infer": logp.astype(np.float64),
        "topk_ids_infer": list(top_ids),
        "topk_logp_infer": list(top_lp),
        "finish_reason": str(finish_reason or "length"),
        "text": text,
    }


class HfEngine:
    """transformers generation with vLLM's sampling rules, scored teacher-forced."""

    def __init__(self, model_path: str, cfg: MeasureConfig, device: Any) -> None:
        from .models import load_model
        from .sampling import Sampling

        self.cfg = cfg
        self.device = device
        self.model, self.tokenizer = load_model(
            model_path, cfg.infer_dtype, device, cfg.attn_implementation
        )
        self.sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)

    def generate(
        self, prompts: Sequence[tuple[int, list[int]]], advance: Callable[[int], None]
    ) -> list[Record]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from .rescore import SeqInput, score_sequences
        from .sampling import processed_logprobs

        sampling = self.sampling

        class Replay(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                return processed_logprobs(scores, sampling)

        from transformers import GenerationConfig

        c = self.cfg
        # Stop where vLLM stops: the tokenizer's EOS and the generation config's EOS list.
        gen_eos = self.model.generation_config.eos_token_id
        eos_ids = {
            self.tokenizer.eos_token_id,
            *(gen_eos if isinstance(gen_eos, list) else [gen_eos]),
        }
        eos_ids.discard(None)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # A fresh config: the model's own (repetition penalty, default top-k, ...) must not apply.
        gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=c.max_tokens,
            num_return_sequences=c.samples_per_prompt,
            pad_token_id=pad,
            eos_token_id=sorted(eos_ids),
        )
        records: list[Record] = []
        for pid, ids in prompts:
            torch.manual_seed(c.seed + pid * c.samples_per_prompt)
            inp = torch.tensor([ids], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=inp,
                    attention_mask=torch.ones_like(inp),
                    generation_config=gen_cfg,
                    logits_processor=LogitsProcessorList([Replay()]),
                )
            for j in range(gen.shape[0]):
                out = gen[j, len(ids) :].tolist()
                finish = "length"
                stop = next((t for t, tok in enumerate(out) if tok in eos_ids), None)
                if stop is not None:
                    out = out[: stop + 1]
                    finish = "stop"
                records.append({"pid": pid, "j": j, "ids": ids, "toks": out, "finish": finish})
            advance(gen.shape[0])
        # Log-probs of the sampling distribution, teacher-forced, in the inference dtype.
        K = c.top_logprobs
        seqs = [
            SeqInput(
                r["ids"],
                r["toks"],
                np.full((len(r["toks"]), 0), -1, dtype=np.int32),
                np.full((len(r["toks"]), 0), -np.inf, dtype=np.float32),
                np.zeros(len(r["toks"])),
            )
            for r in records
        ]
        scored = score_sequences(self.model, seqs, sampling, K, self.device, c.rescore_batch_tokens)
        out_records = []
        for r, s in zip(records, scored, strict=True):
            text = self.tokenizer.decode(r["toks"], skip_special_tokens=True)
            out_records.append(
                _record(
                    r["pid"],
                    r["j"],
                    r["ids"],
                    r["toks"],
                    s["logp_train"].astype(np.float64),
                    s["topk_ids_train"].astype(np.int32),
                    s["topk_logp_train"].astype(np.float32),
                    r["finish"],
                    text,
                )
            )
        return out_records

    def close(self) -> None:
        del self.model
