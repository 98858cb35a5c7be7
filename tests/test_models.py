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


def _weights_folder(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model-00001.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "model-00002.safetensors").write_bytes(b"second shard" * 100)
    (d / "config.json").write_text("{}")  # not a weight file: not hashed
    return d


def test_weights_hash_is_cached_by_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second call reads no weight bytes; touching a file hashes again. The value is the
    same sha256 as before the cache existed (name then bytes of each file, in order), so
    older runs still resume."""
    import hashlib
    import os

    from mismatch_cli import models

    monkeypatch.setenv("MISMATCH_CACHE", str(tmp_path / "cache"))
    d = _weights_folder(tmp_path)
    expect = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        expect.update(f.name.encode() + f.read_bytes())
    reads: list[int] = []
    real = models._sha256_files
    monkeypatch.setattr(models, "_sha256_files", lambda files: reads.append(1) or real(files))

    assert models.weights_hash(str(d)) == expect.hexdigest() and len(reads) == 1
    assert (tmp_path / "cache" / models.WEIGHTS_HASH_CACHE).is_file()
    assert models.weights_hash(str(d)) == expect.hexdigest() and len(reads) == 1  # cached

    real_open = Path.open

    def no_weight_reads(self: Path, *a: object, **k: object) -> object:
        assert self.suffix != ".safetensors", f"{self.name} was read"
        return real_open(self, *a, **k)

    with monkeypatch.context() as m:  # a cached call opens no weight file
        m.setattr(Path, "open", no_weight_reads)
        assert models.weights_hash(str(d)) == expect.hexdigest()

    shard = d / "model-00002.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hash again
    assert models.weights_hash(str(d)) == expect.hexdigest() and len(reads) == 2
    shard.write_bytes(b"other weights")  # replaced: a new value
    assert models.weights_hash(str(d)) != expect.hexdigest() and len(reads) == 3


def test_weights_hash_cache_survives_a_broken_or_unwritable_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mismatch_cli import models

    d = _weights_folder(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / models.WEIGHTS_HASH_CACHE).write_text("{not json")
    monkeypatch.setenv("MISMATCH_CACHE", str(cache))
    h = models.weights_hash(str(d))
    assert h is not None and str(d.resolve()) in json.loads(
        (cache / models.WEIGHTS_HASH_CACHE).read_text()
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MISMATCH_CACHE", str(blocker / "cache"))  # cannot be created
    assert models.weights_hash(str(d)) == h
