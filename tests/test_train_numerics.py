"""The training side's numerics of diagnose's training-side variants on a tiny random Llama
(no engine): packed rows and left padding score the same positions as one sequence per row
(to float32 rounding), a bf16 log-softmax gives bf16 log-probs, and `cast_head_fp32` puts
the LM head and the final norm (only them) in float32, tied embeddings included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mismatch_cli.models import cast_head_fp32
from mismatch_cli.rescore import (
    SeqInput,
    TrainNumerics,
    forward_logits,
    make_packed_batches,
    score_sequences,
)
from mismatch_cli.sampling import Sampling

T1 = Sampling(1.0, 1.0, -1, 0.0)


def _llama(tied: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager", tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _seqs() -> list[SeqInput]:
    rng = np.random.default_rng(0)
    out = []
    for p, t in [(5, 7), (9, 3), (3, 11), (6, 1)]:
        out.append(SeqInput(rng.integers(3, 97, p).tolist(), rng.integers(3, 97, t).tolist(),
                            np.zeros((t, 0), np.int32), np.zeros((t, 0), np.float32),
                            np.zeros(t)))  # fmt: skip
    return out


@pytest.mark.parametrize("layout", ["left", "packed"])
def test_layouts_score_the_same_positions(layout: str) -> None:
    """Each sequence's logits in a left-padded or packed batch are its logits alone (the
    positions line up, no sequence attends to another), to float32 rounding."""
    m, seqs = _llama(tied=False), _seqs()
    with torch.inference_mode():
        alone = [forward_logits(m, [s], "cpu")[0] for s in seqs]
        logits, slices = forward_logits(m, seqs, "cpu", layout)
    for s, a, sl in zip(seqs, alone, slices, strict=True):
        assert logits[sl].shape == (len(s.response_token_ids), 97)
        torch.testing.assert_close(logits[sl], a, rtol=0, atol=1e-5)
    # through score_sequences: the same tokens scored, the difference reported (0 included)
    a = score_sequences(m, seqs, T1, 5, "cpu", 4096)
    b = score_sequences(m, seqs, T1, 5, "cpu", 24, numerics=TrainNumerics(layout=layout))
    for x, y, s in zip(a, b, seqs, strict=True):
        assert len(y["logp_train"]) == len(s.response_token_ids)
        assert np.abs(x["logp_train"] - y["logp_train"]).max() < 1e-5


def test_packed_rows_hold_several_sequences() -> None:
    assert make_packed_batches([(5, 7), (9, 3), (3, 11), (6, 1)], 24) == [[0, 1], [2, 3]]
    assert make_packed_batches([(40, 2), (3, 1)], 10) == [[0], [1]]  # one long row alone


def test_bf16_log_softmax() -> None:
    """logsoftmax_dtype bfloat16: every log-prob is a bfloat16 value; the fp32 log-softmax
    of the same bf16 logits is not (and the two differ by bf16 rounding at most)."""
    m, seqs = _llama(tied=False, dtype=torch.bfloat16), _seqs()
    low = score_sequences(
        m, seqs, T1, 5, "cpu", numerics=TrainNumerics(logsoftmax_dtype="bfloat16")
    )
    ref = score_sequences(m, seqs, T1, 5, "cpu")
    lp = np.concatenate([r["logp_train"] for r in low]).astype(np.float32)
    lp32 = np.concatenate([r["logp_train"] for r in ref]).astype(np.float32)
    as_bf16 = torch.tensor(lp).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(lp, as_bf16)
    assert not np.array_equal(lp32, torch.tensor(lp32).to(torch.bfloat16).float().numpy())
    assert np.abs(lp - lp32).max() < 0.1 * np.abs(lp32).max()


@pytest.mark.parametrize("tied", [True, False])
def test_cast_head_fp32(tied: bool) -> None:
    m = _llama(tied=tied, dtype=torch.bfloat16)
    cast_head_fp32(m)
    assert m.lm_head.weight.dtype == torch.float32 and m.model.norm.weight.dtype == torch.float32
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([_seqs()[0].prompt_token_ids])
    with torch.inference_mode():
        assert m.model.embed_tokens(ids).dtype == torch.bfloat16  # layers still get bf16
        assert m(input_ids=ids).logits.dtype == torch.float32
    # scoring with it: the log-probs move towards the fp32 model's, reported either way
    f32 = _llama(tied=tied)
    seqs = _seqs()
    ref = np.concatenate([r["logp_train"] for r in score_sequences(f32, seqs, T1, 5, "cpu")])
    got = np.concatenate([r["logp_train"] for r in score_sequences(m, seqs, T1, 5, "cpu")])
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.05
