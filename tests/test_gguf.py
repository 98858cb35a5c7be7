"""Any GGUF model file: `mismatch measure model.gguf` (and `--model-file`) converts it once
into a cached safetensors folder, keeps the file's `add_bos_token`, and refuses what it
cannot read in one line. The GGUF files are tiny Llamas written here with the `gguf` package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mismatch_cli.errors import MismatchError
from mismatch_cli.models import (
    GGUF_SOURCE_FILE,
    convert_gguf,
    gguf_cache_dir,
    load_model,
    resolve_model,
)

from .conftest import assert_one_line_error, cli_in_process, run_cli

N_HEAD, N_KV, HIDDEN, LAYERS, CONTEXT = 4, 2, 32, 2, 1024
MERGES = ["h e", "l l", "he ll", "hell o"]


def _vocab() -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 bytes, four merges, <s> and </s> (262 tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["he", "ll", "hell", "hello", "<s>", "</s>"]
    types = [1] * (len(tokens) - 2) + [3, 3]  # 3 = control
    return tokens, types


def _source_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, _ = _vocab()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=N_HEAD, num_key_value_heads=N_KV,
        max_position_embeddings=CONTEXT, bos_token_id=len(tokens) - 2,
        eos_token_id=len(tokens) - 1, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of the q/k rows (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path, *, add_bos: bool | None = True, architecture: str = "llama"
) -> torch.nn.Module:
    """Write `_source_model()` as an F32 GGUF with tokenizer metadata, as llama.cpp's
    converter would; return the source model (its logits are what the file must give)."""
    import gguf

    model = _source_model()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tokens, types = _vocab()
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // N_HEAD)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }  # fmt: skip
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[f"{p}{h}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], N_HEAD))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], N_KV))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh user cache (MISMATCH_CACHE), also seen by CLI subprocesses."""
    c = tmp_path / "cache"
    monkeypatch.setenv("MISMATCH_CACHE", str(c))
    return c


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, add_bos=True)
    return path


def test_transformers_reads_the_written_gguf_back(tiny_gguf: Path) -> None:
    """The test file is a faithful GGUF: transformers' own reader gives the source logits."""
    from transformers import AutoModelForCausalLM

    src = _source_model()
    back = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([[1, 2, 3, 259, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, src(x).logits, rtol=0, atol=1e-6)


def test_conversion_gives_the_source_model_in_a_cached_folder(cache: Path, tiny_gguf: Path) -> None:
    folder = convert_gguf(tiny_gguf, quiet=True)
    assert folder == gguf_cache_dir(tiny_gguf)
    assert folder.is_relative_to(cache / "models" / "gguf")
    source = json.loads((folder / GGUF_SOURCE_FILE).read_text())
    assert source["gguf"] == str(tiny_gguf.resolve()) and source["architecture"] == "llama"
    assert source["dtype"] == "float32"  # an F32 file is stored losslessly
    model, tok = load_model(str(folder), "float32", torch.device("cpu"))
    x = torch.tensor([[260, 1, 2, 3, 259, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, _source_model()(x).logits, rtol=0, atol=1e-6)
    assert tok.convert_ids_to_tokens([259, 260, 261]) == ["hello", "<s>", "</s>"]


def test_second_conversion_reuses_the_cache_and_a_changed_file_converts_again(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f)
    first = convert_gguf(f, quiet=True)
    import transformers

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert convert_gguf(f, quiet=True) == first
    assert resolve_model(str(f)) == (str(first), "m")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: new key
    assert gguf_cache_dir(f) != first
    with pytest.raises(AssertionError, match="converted again"):
        convert_gguf(f, quiet=True)


@pytest.mark.parametrize("add_bos", [True, False])
def test_add_bos_token_of_the_file_is_honoured(cache: Path, tmp_path: Path, add_bos: bool) -> None:
    """transformers' GGUF tokenizer drops `tokenizer.ggml.add_bos_token` (it never adds
    <s> here); the converted tokenizer follows the file, on every reload."""
    from transformers import AutoTokenizer

    f = tmp_path / f"bos-{add_bos}.gguf"
    write_tiny_gguf(f, add_bos=add_bos)
    raw = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    assert raw("hello").input_ids == [259]  # what transformers alone gives, whatever the file says
    tok = AutoTokenizer.from_pretrained(convert_gguf(f, quiet=True))
    assert tok("hello").input_ids == ([260, 259] if add_bos else [259])
    assert tok("hello", add_special_tokens=False).input_ids == [259]


def test_model_file_picks_a_gguf_in_a_folder_or_a_package(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "site" / "tiny_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    write_tiny_gguf(pkg / "a.gguf")
    (pkg / "b.gguf").write_bytes((pkg / "a.gguf").read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path, name = resolve_model("tiny_gguf_pkg", "b.gguf")  # a package: found, not imported
    assert name == "b" and Path(path) == gguf_cache_dir(pkg / "b.gguf")
    assert resolve_model(str(pkg), "a.gguf")[1] == "a"  # a folder
    with pytest.raises(MismatchError, match="several GGUF files"):
        resolve_model(str(pkg))
    (pkg / "b.gguf").unlink()
    assert resolve_model(str(pkg))[1] == "a"  # the only GGUF of a folder without config.json
    with pytest.raises(MismatchError, match=r"--model-file c.gguf not found .*a.gguf"):
        resolve_model(str(pkg), "c.gguf")
    with pytest.raises(MismatchError, match="neither a folder nor an installed package"):
        resolve_model("no_such_package_here", "a.gguf")


def test_not_a_gguf_is_one_line(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_text("hello, I am text\n")
    proc = cli_in_process("measure", str(f), "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "is not a GGUF file")
    assert not (tmp_path / "r").exists()


def test_architecture_transformers_cannot_read_is_one_line(cache: Path, tmp_path: Path) -> None:
    f = tmp_path / "odd.gguf"
    write_tiny_gguf(f, architecture="rwkv6")
    proc = cli_in_process("measure", str(f), "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "transformers cannot read odd.gguf", "'rwkv6'")
    with pytest.raises(MismatchError, match="not supported"):
        convert_gguf(f, quiet=True)


def test_a_file_that_is_not_gguf_or_missing_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(MismatchError, match=r"pass the model folder or a \.gguf file"):
        resolve_model(str(f))
    with pytest.raises(MismatchError, match="model file not found"):
        resolve_model(str(tmp_path / "gone.gguf"))


def test_measure_a_gguf_end_to_end(cache: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """`mismatch measure model.gguf` with the transformers engine: converted once, recorded,
    scored; the null check (same dtype on both sides) holds exactly."""
    out = tmp_path / "run"
    proc = run_cli(
        "measure", str(tiny_gguf), "--infer-engine", "hf", "--infer-dtype", "float32",
        "--no-chat-template", "--num-prompts", "2", "--samples-per-prompt", "1",
        "--max-tokens", "4", "--top-logprobs", "3", "--no-plots", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a quiet log: our own lines only, no third-party bars (GGUF de-quantisation, weight
    # loading, shard writing: carriage returns) and no warnings
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert "Converting tiny-llama" in proc.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"]["name"] == "tiny-llama"
    assert meta["model"]["path"] == str(gguf_cache_dir(tiny_gguf))
    import pandas as pd

    tokens = pd.read_parquet(out / "tokens.parquet", columns=["delta"])
    assert len(tokens) > 0 and (tokens["delta"] == 0).all()
    prompt_ids = pd.read_parquet(out / "sequences.parquet")["prompt_token_ids"]
    assert all(ids[0] == 260 for ids in prompt_ids)  # the file's add_bos_token: <s> first
