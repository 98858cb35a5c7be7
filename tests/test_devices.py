"""Many devices, tested where no GPU is: the training side spread with accelerate
(`--device-map`, `--max-memory`), the vLLM engine arguments (tensor and pipeline
parallelism), and `measure` never holding two engines at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch_cli.config import MeasureConfig, parse_engine_args, parse_max_memory
from mismatch_cli.errors import MismatchError
from mismatch_cli.models import input_device, load_model
from mismatch_cli.rescore import SeqInput, score_sequences
from mismatch_cli.rollout import vllm_engine_kwargs
from mismatch_cli.sampling import Sampling

from .conftest import ROOT, assert_one_line_error, cli_in_process, run_cli


def _seqs(vocab: int = 97) -> list[SeqInput]:
    rng = np.random.default_rng(1)
    out = []
    for P, T in [(4, 5), (7, 2), (3, 6)]:
        out.append(
            SeqInput(
                rng.integers(3, vocab, P).tolist(),
                rng.integers(3, vocab, T).tolist(),
                rng.integers(3, vocab, (T, 4)).astype(np.int32),
                np.full((T, 4), -2.0, np.float32),
                np.full(T, -2.0),
            )
        )
    return out


def test_max_memory_parses_like_accelerate_wants_it() -> None:
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {
        0: "70GiB",
        1: "70GiB",
        "cpu": "200GiB",
    }
    assert parse_max_memory(None) is None
    for bad in ("0:70GiB", "gpu0=70GiB", "0=lots", "0=70", "0=70GiB,,cpu=1GB"):
        with pytest.raises(MismatchError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(MismatchError, match="--max-memory needs --device-map"):
        MeasureConfig(max_memory="cpu=1GiB").validate()
    with pytest.raises(MismatchError, match="--pipeline-parallel-size must be >= 1"):
        MeasureConfig(pipeline_parallel_size=0).validate()
    MeasureConfig(device_map="auto", max_memory="0=70GiB,cpu=200GiB").validate()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
        (["--device-map", "auto", "--max-memory", "0=70"], "'0=70'"),
        (["--pipeline-parallel-size", "0"], "--pipeline-parallel-size must be >= 1"),
        (["--engine-arg", "pipeline_parallel_size=2"], "is set by measure itself"),
    ],
)
def test_bad_parallelism_flags_are_one_line(tmp_path: Path, flags: list[str], needle: str) -> None:
    proc = cli_in_process("measure", *flags, "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "r").exists()


def test_vllm_engine_kwargs_pass_parallelism_through() -> None:
    """What `VllmEngine` hands to `vllm.LLM(...)`, built without starting vLLM."""
    cfg = MeasureConfig(
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        infer_dtype="float16",
        max_model_len=8192,
        engine_args=parse_engine_args(
            ["distributed_executor_backend=ray", "gpu_memory_utilization=0.85"]
        ),
    )
    kw = vllm_engine_kwargs("/models/llama-70b", cfg)
    assert kw["model"] == "/models/llama-70b"
    assert kw["tensor_parallel_size"] == 4 and kw["pipeline_parallel_size"] == 2
    assert kw["distributed_executor_backend"] == "ray" and kw["gpu_memory_utilization"] == 0.85
    assert kw["dtype"] == "float16" and kw["max_model_len"] == 8192
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert vllm_engine_kwargs("m", MeasureConfig())["pipeline_parallel_size"] == 1
    import inspect

    from vllm.engine.arg_utils import EngineArgs

    # every key measure sets is an argument vLLM's engine knows (LLM passes them there)
    own = set(vllm_engine_kwargs("m", MeasureConfig()))
    assert own <= set(inspect.signature(EngineArgs).parameters)


def test_rescoring_through_an_accelerate_dispatched_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A model spread by accelerate (here: two modules offloaded, moved in by hooks at each
    forward) scores exactly like the plain model; inputs go to the embedding's device
    whatever `device` says, and the per-position work runs where the logits are."""
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    plain, _ = load_model(str(tiny_model_dir), "float32", cpu)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    spread = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        attn_implementation="eager",
    ).eval()
    assert spread.lm_head.weight.device.type == "meta"  # really dispatched, hooks in place
    assert input_device(spread, torch.device("meta")) == cpu
    seqs, s = _seqs(), Sampling(temperature=0.8, top_p=0.9)
    want = score_sequences(plain, seqs, s, 3, cpu, batch_tokens=16)
    got = score_sequences(spread, seqs, s, 3, torch.device("meta"), batch_tokens=16)
    for a, b in zip(want, got, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_load_model_with_a_device_map(tiny_model_dir: Path) -> None:
    cpu = torch.device("cpu")
    plain, _ = load_model(str(tiny_model_dir), "float32", cpu)
    mapped, _ = load_model(
        str(tiny_model_dir), "float32", None, device_map="auto", max_memory={"cpu": "1GiB"}
    )
    assert input_device(mapped) == cpu
    seqs = _seqs()
    a = score_sequences(plain, seqs, Sampling(), 3, cpu)
    b = score_sequences(mapped, seqs, Sampling(), 3, cpu)
    np.testing.assert_array_equal(
        np.concatenate([x["logp_train"] for x in a]), np.concatenate([x["logp_train"] for x in b])
    )
    with pytest.raises(MismatchError, match="offloaded to disk"):
        load_model(
            str(tiny_model_dir), "float32", None, device_map="auto", max_memory={"cpu": "1KiB"}
        )
    if not torch.cuda.is_available():
        with pytest.raises(MismatchError, match="--device-map sequential"):
            load_model(
                str(tiny_model_dir),
                "float32",
                None,
                device_map="sequential",
                max_memory={0: "1GiB", "cpu": "1GiB"},
            )


def test_measure_with_a_device_map_keeps_the_null_check(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`measure --device-map auto --max-memory cpu=...` end to end (transformers on both
    sides, float32): the spread training side gives every token delta == 0 exactly."""
    out = tmp_path / "run"
    proc = run_cli(
        "measure", str(tiny_model_dir), "--infer-engine", "hf", "--infer-dtype", "float32",
        "--device-map", "auto", "--max-memory", "cpu=2GiB", "--no-chat-template",
        "--num-prompts", "3", "--samples-per-prompt", "2", "--max-tokens", "5",
        "--top-logprobs", "3", "--no-plots", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["device_map"] == "auto" and cfg["max_memory"] == "cpu=2GiB"
    delta = pd.read_parquet(out / "tokens.parquet", columns=["delta"])["delta"]
    assert len(delta) > 0 and (delta == 0).all()


def test_measure_frees_the_inference_engine_before_loading_the_training_side(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of a real (small) run: inference model loaded, engine closed, and only then
    the training model loaded, with the inference model already garbage."""
    from mismatch_cli import models, rollout
    from mismatch_cli.measurement import run_measure

    events: list[tuple[str, list[bool]]] = []
    alive: list[weakref.ref] = []
    real_load = models.load_model

    def spy_load(*a: object, **k: object) -> tuple[object, object]:
        events.append(("load", [r() is not None for r in alive]))
        model, tok = real_load(*a, **k)
        alive.append(weakref.ref(model))
        return model, tok

    class SpyEngine(rollout.HfEngine):
        def close(self) -> None:
            events.append(("close", []))
            super().close()

    monkeypatch.setattr(models, "load_model", spy_load)
    monkeypatch.setattr(rollout, "HfEngine", SpyEngine)
    cfg = MeasureConfig(
        model=str(tiny_model_dir), infer_engine="hf", chat_template=False, num_prompts=2,
        samples_per_prompt=1, max_tokens=3, top_logprobs=3, chunk_prompts=1,
    )  # fmt: skip
    run_measure(cfg, tmp_path / "run")
    assert [e for e, _ in events] == ["load", "close", "load"]
    assert events[2][1] == [False]  # the inference model is gone when training loads


@pytest.mark.integration
def test_vllm_engine_process_is_gone_before_the_training_side_loads(
    vllm_many_prompts_run: dict,
) -> None:
    """With the real vLLM engine: the processes vLLM starts (EngineCore, its workers) have
    exited when `measure` loads the transformers model (the run and its spies:
    conftest.vllm_many_prompts_run)."""
    started, seen_at_load = vllm_many_prompts_run["started"], vllm_many_prompts_run["seen_at_load"]
    assert started, "no engine process was seen: the check would prove nothing"
    assert seen_at_load == [[]], f"vLLM processes still running at training load: {seen_at_load}"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: runs for real")
def test_gpu_smoke_script_refuses_without_a_gpu() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True
    )
    assert_one_line_error(proc, "no GPU")
    assert proc.stdout == ""
