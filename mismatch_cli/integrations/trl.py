"""TRL's `GRPOTrainer` with the mismatch monitor and dynamic vocabulary pruning (DVP) in the loss.

Written and tested against trl 1.16.0 (`trl/trainer/grpo_trainer.py`, transformers 5.19);
docs/integrations.md ("TRL") is the user's guide.

    trainer = MismatchGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                  train_dataset=..., dvp_rho=None, tokens_dir="mismatch_tokens")

Per generation round (`_generate_and_score_completions`, training only) the plug-in reads
- the inference side: `sampling_per_token_logps` (TRL's vLLM path, or the `logprobs` of a
  `rollout_func` such as `TransformersRollout`);
- the training side: `old_per_token_logps` where TRL computed it (vLLM with its importance-sampling
  correction, or gradient accumulation misaligned with generation); else the plug-in computes it
  with the trainer's own `_get_per_token_logps_and_entropies` under no_grad (one extra forward
  over the generation batch), kept out of the batch so TRL's loss is unchanged;
- the mask: TRL's loss mask, `completion_mask * tool_mask`;
feeds them to `monitor.StepMonitor` and appends its `mismatch/...` metrics to the trainer's own
metrics, which TRL's `log()` sends to `trainer.state.log_history` and every `report_to` logger.
Optionally each round is written as a `tokens` Parquet file for `mismatch import tokens`.

With `dvp_rho`, the policy's per-token log-probs (in the loss and in the old log-probs TRL
computes) are those of the pruned policy, `dvp.pruned_logprobs` at rho (min-p rule, at the
sampling temperature); sampled tokens outside the trainer's safe set leave the loss mask.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from ..dvp import pruned_logprobs, pruned_mass
from ..monitor import PREFIX, StepMonitor
from ..sampling import Sampling, processed_logprobs

try:
    from transformers import (
        GenerationConfig,
        LogitsProcessor,
        LogitsProcessorList,
        TrainerCallback,
    )
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        f"mismatch_cli.integrations.trl needs TRL ({e}): pip install 'mismatch-cli[trl]'"
    ) from e

TRL_VERSION = "1.16.0"  # the release this plug-in was written and tested against
# Multimodal inputs `_compute_loss` passes to the forward (the output dict's keys).
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


class _CloseMonitor(TrainerCallback):
    """Finishes the monitor's sampled run directory (if any) when training ends."""

    def __init__(self, monitor: StepMonitor) -> None:
        self.monitor, self.closed = monitor, False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.closed:
            self.closed = True
            self.monitor.close()


class MismatchGRPOMixin:
    """Mix in before a `GRPOTrainer` (or a subclass of it): `class T(MismatchGRPOMixin, MyGRPO)`.

    Keyword arguments (the rest go to the trainer): `mismatch_monitor` (a `StepMonitor`; default
    `StepMonitor()`, e.g. with `sample=TokenSampler(dir)` to keep a run directory), `dvp_rho`
    (DVP's threshold in the loss; None: the loss is TRL's), `tokens_dir` (write each generation
    round as a `tokens` Parquet file there). Bad tensors never stop a step: the monitor's
    ValueError is caught, warned about once, and the round goes unmeasured."""

    def __init__(
        self,
        *args: Any,
        mismatch_monitor: StepMonitor | None = None,
        dvp_rho: float | None = None,
        tokens_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        if dvp_rho is not None and not 0 < dvp_rho < 1:
            raise ValueError(f"dvp_rho must be in (0, 1), got {dvp_rho}")
        self.mismatch_monitor = mismatch_monitor if mismatch_monitor is not None else StepMonitor()
        self.dvp_rho = dvp_rho
        self.mismatch_tokens_dir = Path(tokens_dir) if tokens_dir is not None else None
        self._mismatch_warned: set[str] = set()
        self._mismatch_lens: list[int] | None = None
        self._mismatch_rounds = 0
        self._dvp_capture: dict[str, torch.Tensor] | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(_CloseMonitor(self.mismatch_monitor))
        if dvp_rho is not None and self.min_p != dvp_rho:
            self._mismatch_warn(
                "min_p",
                f"dvp_rho={dvp_rho} but the rollouts sample with min_p={self.min_p}: sampled tokens "
                "outside the safe set leave the loss; sample with min_p = dvp_rho to train on "
                "the same set the engine samples from",
            )

    def _mismatch_warn(self, key: str, message: str) -> None:
        if key not in self._mismatch_warned:
            self._mismatch_warned.add(key)
            warnings.warn(f"mismatch: {message}", RuntimeWarning, stacklevel=3)

    # -- the generation round ------------------------------------------------------------

    def _generate(self, prompts: list) -> tuple:
        out = super()._generate(prompts)
        self._mismatch_lens = [len(c) for c in out[1]]  # completion_mask can be zeroed later
        return out

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._dvp_capture = None
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        cm = out["completion_mask"]
        tool = out.get("tool_mask")
        mask = cm if tool is None else cm * tool  # TRL's loss mask
        train = self._mismatch_train_side(out)
        if self.dvp_rho is not None:
            cap = self._dvp_capture
            assert cap is not None  # set by the policy forward just made
            kept = cap["kept"]
            out["tool_mask"] = (torch.ones_like(cm) if tool is None else tool) * kept.to(cm.dtype)
            m = mask.bool()
            n = max(int(m.sum()), 1)
            for key, v in (
                ("dvp/rho", float(self.dvp_rho)),
                ("dvp/pruned_mass_mean", float(cap["mass"][m].double().sum()) / n),
                ("dvp/tokens_outside", float((~kept[m]).sum()) / n),
            ):
                self._metrics["train"][PREFIX + key].append(v)
        self._mismatch_measure(out, train, mask)
        return out

    def _mismatch_train_side(self, out: dict[str, Any]) -> torch.Tensor:
        """The training side's per-token log-probs [B, T] of this round (DVP: log p~, -inf for
        tokens outside the safe set)."""
        if self.dvp_rho is None and out.get("old_per_token_logps") is not None:
            return out["old_per_token_logps"]
        if self.dvp_rho is not None and "old_per_token_logps" in out and self._dvp_capture:
            return self._dvp_capture["logp"]  # TRL's own old log-probs, through the DVP forward
        self._dvp_capture = None
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        forward = {k: out[k] for k in _FORWARD_KEYS if k in out}
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                ids,
                am,
                out["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
                **forward,
            )
        return self._dvp_capture["logp"] if self.dvp_rho is not None else logps

    def _mismatch_measure(
        self, out: dict[str, Any], train: torch.Tensor, mask: torch.Tensor
    ) -> None:
        infer = out.get("sampling_per_token_logps")
        if infer is None:
            self._mismatch_warn(
                "no-infer",
                "this generation path returns no inference-side log-probs (TRL's transformers "
                "generation keeps none): use use_vllm=True or rollout_func=TransformersRollout(); "
                "the mismatch is not measured",
            )
            return
        step = int(self.state.global_step)
        try:
            metrics = self.mismatch_monitor.update(
                infer, train, mask, step=step, token_ids=out["completion_ids"]
            )
        except ValueError as e:
            self._mismatch_warn("bad-input", f"step {step} not measured (and not the next): {e}")
            return
        for key, v in metrics.items():
            self._metrics["train"][key].append(v)
        if self.mismatch_tokens_dir is not None:
            self._mismatch_write_tokens(out, infer, train, mask, step)

    def _mismatch_write_tokens(
        self,
        out: dict[str, Any],
        infer: torch.Tensor,
        train: torch.Tensor,
        mask: torch.Tensor,
        step: int,
    ) -> None:
        """This round as a `tokens` Parquet file (docs/import.md): one row per completion."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        P, PM = out["prompt_ids"].cpu(), out["prompt_mask"].cpu().bool()  # left-padded
        C = out["completion_ids"].cpu()
        LI, LT = infer.detach().double().cpu(), train.detach().double().cpu()
        M, A = mask.cpu().int(), out["advantages"].detach().double().cpu()
        lens = self._mismatch_lens if self._mismatch_lens else [C.size(1)] * C.size(0)
        rows: dict[str, list] = {
            k: []
            for k in (
                "prompt_token_ids", "response_token_ids", "logprobs_infer", "logprobs_train",
                "loss_mask", "step", "advantage",
            )
        }  # fmt: skip
        for i, n in enumerate(lens):
            rows["prompt_token_ids"].append(P[i][PM[i]].tolist())
            rows["response_token_ids"].append(C[i, :n].tolist())
            rows["logprobs_infer"].append(LI[i, :n].tolist())
            rows["logprobs_train"].append(LT[i, :n].tolist())
            rows["loss_mask"].append(M[i, :n].tolist())
            rows["step"].append(step)
            rows["advantage"].append(A[i, :n].tolist() if A.dim() == 2 else float(A[i]))
        d = self.mismatch_tokens_dir
        assert d is not None
        d.mkdir(parents=True, exist_ok=True)
        rank = int(self.accelerator.process_index)
        name = f"step_{step:06d}_rank_{rank}_round_{self._mismatch_rounds}.parquet"
        self._mismatch_rounds += 1
        pq.write_table(pa.table(rows), d / name)

    # -- DVP: the policy's per-token log-probs over the safe vocabulary --------------------

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's, or with `dvp_rho` for the policy: log p~ of each completion token (a token
        outside the safe set gets its plain log-prob, detached, and is out of the loss mask);
        the entropy stays the plain policy's. Materialises each micro-batch's completion
        logits [b, T, V] (TRL's fused LM head does not)."""
        if self.dvp_rho is None or model is self.ref_model:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **kwargs,
            )
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:
            raise NotImplementedError(f"dvp_rho supports text-only models (got {extra})")
        rho, temp = float(self.dvp_rho), float(self.temperature)
        bs = batch_size or input_ids.size(0)
        logps, raw, kept_all, mass_all, ents, auxes = [], [], [], [], [], []
        for s in range(0, input_ids.size(0), bs):
            ids, am = input_ids[s : s + bs], attention_mask[s : s + bs]
            inputs = {"input_ids": ids, "attention_mask": am, "use_cache": False}
            inputs["logits_to_keep"] = logits_to_keep + 1
            if compute_aux_loss:
                inputs["output_router_logits"] = True
            with self.accelerator.autocast():
                outputs = model(**inputs)
            logits = outputs.logits[:, :-1].float()  # [b, T, V]: position j predicts token j+1
            tokens = ids[:, -logits_to_keep:]  # [b, T]
            lp, kept = pruned_logprobs(logits, tokens, rho, "min-p", temp)  # [b, T]
            with torch.no_grad():
                z = logits.detach() / temp
                plain = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
                mass_all.append(pruned_mass(logits.detach(), rho, "min-p", temp))
            logps.append(torch.where(kept, lp, plain))
            raw.append(lp.detach())
            kept_all.append(kept)
            if compute_entropy:
                with torch.set_grad_enabled(
                    torch.is_grad_enabled() and self._entropy_bonus_enabled
                ):
                    probs = torch.softmax(logits / temp, dim=-1)
                    ents.append(torch.special.entr(probs).sum(-1))
            if compute_aux_loss:
                auxes.append(outputs.aux_loss)
        if not torch.is_grad_enabled() and self._dvp_capture is None:
            self._dvp_capture = {
                "logp": torch.cat(raw),
                "kept": torch.cat(kept_all),
                "mass": torch.cat(mass_all),
            }
        return (
            torch.cat(logps),
            torch.cat(ents) if compute_entropy else None,
            torch.stack(auxes).mean() if compute_aux_loss else None,
        )


class MismatchGRPOTrainer(MismatchGRPOMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with the mismatch monitor (and DVP with `dvp_rho`); see the mixin."""


class _Replay(LogitsProcessor):
    """transformers' generate sampling from vLLM's processed distribution (`sampling.py`)."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return processed_logprobs(scores, self.sampling)


class TransformersRollout:
    """A TRL `rollout_func` that runs on a CPU: transformers' `generate` on a copy of the
    trainer's current weights in `dtype` (default bfloat16: the inference engine's dtype, so
    the two sides differ as vLLM's bf16 and a float32 trainer do), sampling with the trainer's
    temperature, top-p, top-k and min-p (vLLM's rules), returning the processed log-prob of
    each sampled token as generate scored it (KV cache, one token per step). The copy is
    re-synced whenever the trainer's global step has moved. Text-only; repetition penalty is
    not replayed."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        self.dtype = dtype
        self._model: Any = None
        self._step: int | None = None

    def _engine(self, trainer: Any) -> Any:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if self._model is None:
            # A fresh instance of the class: TRL's fused-LM-head forward is patched on the
            # policy instance only, so this one generates with the model's own forward.
            self._model = type(policy)(copy.deepcopy(policy.config))
            self._model.to(device=policy.device, dtype=self.dtype or policy.dtype).eval()
        if self._step != trainer.state.global_step:
            self._model.load_state_dict(policy.state_dict())
            self._step = trainer.state.global_step
        return self._model

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
        if images:
            raise NotImplementedError("TransformersRollout is text-only")
        if getattr(trainer, "repetition_penalty", 1.0) not in (None, 1.0):
            warnings.warn("TransformersRollout does not replay repetition_penalty", stacklevel=2)
        model = self._engine(trainer)
        sampling = Sampling(
            float(trainer.temperature),
            float(trainer.top_p if trainer.top_p is not None else 1.0),
            int(trainer.top_k) if trainer.top_k else -1,
            float(trainer.min_p or 0.0),
        )
        eos = sorted(set(trainer.eos_token_ids))
        pad = trainer._tokenizer.pad_token_id
        pad = eos[0] if pad is None else pad
        gen_cfg = GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=trainer.max_completion_length, pad_token_id=pad, eos_token_id=eos,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        device = next(model.parameters()).device
        L = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), L), pad, dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left-padded, as TRL pads prompts
            ids[i, L - len(p) :] = torch.as_tensor(p)
            am[i, L - len(p) :] = 1
        with torch.inference_mode():
            g = model.generate(
                input_ids=ids.to(device),
                attention_mask=am.to(device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([_Replay(sampling)]),
            )
        new = g.sequences[:, L:].cpu()  # [B, T]
        scores = torch.stack(g.scores, dim=1).float().cpu()  # [B, T, V] processed log-probs
        completions, logprobs = [], []
        for i in range(new.size(0)):
            toks = new[i].tolist()
            n = next((t + 1 for t, tok in enumerate(toks) if tok in eos), len(toks))
            completions.append(toks[:n])
            logprobs.append(scores[i, torch.arange(n), new[i, :n]].tolist())
        return {
            "prompt_ids": [list(p) for p in prompt_ids],
            "completion_ids": completions,
            "logprobs": logprobs,
        }


__all__ = ["TRL_VERSION", "MismatchGRPOMixin", "MismatchGRPOTrainer", "TransformersRollout"]
