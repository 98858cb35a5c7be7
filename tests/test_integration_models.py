"""Any causal LM transformers accepts goes through `measure`: a tiny GPT-2 (GPT2LMHeadModel,
whose name does not end in ForCausalLM) built here from a config, with the default model's
tokenizer (no hub), measured end to end on the real vLLM engine and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from .conftest import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mismatch_cli.models import provision_default_model

    tok = AutoTokenizer.from_pretrained(provision_default_model(quiet=True))
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=512, n_embd=128, n_layer=2, n_head=2,  # head_dim 64:
        # vLLM's CPU attention refuses small head sizes (16 fails)
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gpt2_is_measured_end_to_end(tiny_gpt2: Path, tmp_path: Path) -> None:
    assert json.loads((tiny_gpt2 / "config.json").read_text())["architectures"] == [
        "GPT2LMHeadModel"
    ]
    out = tmp_path / "gpt2-run"
    run_cli(
        "measure", str(tiny_gpt2), "--num-prompts", "2", "--samples-per-prompt", "2",
        "--max-tokens", "8", "--enforce-eager", "--infer-dtype", "float32", "--no-plots",
        "--out", str(out), check=True,
    )  # fmt: skip
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["model"]["name"] == "tiny-gpt2"
    tok = pd.read_parquet(out / "tokens.parquet")
    assert len(tok) == meta["summary"]["num_tokens"] > 0
    # vLLM fp32 vs transformers fp32 on the same random weights: tiny, finite deltas
    assert tok["delta"].abs().max() < 0.05
