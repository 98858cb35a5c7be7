"""Which models load: transformers' own causal-LM rule, and vLLM's registry for the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.models import check_causal_lm, check_vllm_supports, resolve_model


def _folder(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_gpt2_lm_head_model_is_a_causal_lm(tmp_path: Path) -> None:
    """GPT2LMHeadModel does not end in ForCausalLM, yet AutoModelForCausalLM loads it."""
    d = _folder(tmp_path, "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    check_causal_lm(d)
    assert resolve_model(str(d)) == (str(d.resolve()), "gpt2")


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "vit", "architectures": ["ViTModel"]},
        {"architectures": ["BertModel"]},  # no model_type at all
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
    ],
)
def test_models_transformers_cannot_load_as_causal_lm_are_refused(
    tmp_path: Path, config: dict
) -> None:
    d = _folder(tmp_path, "m", config)
    with pytest.raises(MismatchError, match="not a causal LM"):
        check_causal_lm(d)


def test_architecture_vllm_cannot_serve_names_the_hf_engine(tmp_path: Path) -> None:
    d = _folder(tmp_path, "m", {"model_type": "llama", "architectures": ["NoSuchArchForCausalLM"]})
    with pytest.raises(MismatchError) as e:
        check_vllm_supports(str(d))
    assert "NoSuchArchForCausalLM" in str(e.value) and "--infer-engine hf" in str(e.value)
    d2 = _folder(tmp_path, "g", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    check_vllm_supports(str(d2))  # served by vLLM: no error


def test_cpu_prefill_args_cover_the_context(tmp_path: Path) -> None:
    """vLLM's CPU build must never chunk a prefill (a seeded CPU generator cannot rewind)."""
    from mismatch_cli.rollout import cpu_prefill_args

    d = _folder(tmp_path, "m", {"model_type": "llama", "max_position_embeddings": 8192})
    assert cpu_prefill_args(str(d), None) == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 8192,
    }
    assert cpu_prefill_args(str(d), 512)["max_num_batched_tokens"] == 4096
    scaled = _folder(
        tmp_path, "s", {"max_position_embeddings": 4096, "rope_scaling": {"factor": 4.0}}
    )
    assert cpu_prefill_args(str(scaled), None)["max_num_batched_tokens"] == 16384
