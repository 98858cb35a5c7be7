"""`mismatch rescore` on a tiny model (no vLLM): the same settings reproduce logp_train
exactly, prefill sides and option changes are recorded, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch_cli.errors import MismatchError
from mismatch_cli.models import weights_hash
from mismatch_cli.pipeline import ROLLOUT, TrainSide, rescore_parts
from mismatch_cli.rescore_run import RescoreOptions, rescore_run, rollout_parts_of
from mismatch_cli.runs import RunDir, new_meta, read_tokens
from mismatch_cli.sampling import Sampling
from mismatch_cli.schema import STATUS_COMPLETE

from .conftest import ROOT, assert_one_line_error, cli_in_process

K = 5


def _rollouts(first_prompt: int, n_prompts: int, spp: int, masked: bool, seed: int) -> pd.DataFrame:
    """Rollout rows as `measure` writes them: seq_id = prompt_id * spp + sample_idx."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(first_prompt, first_prompt + n_prompts):
        for j in range(spp):
            P, T = int(rng.integers(2, 9)), int(rng.integers(1, 12))
            top = np.stack([rng.choice(np.arange(3, 97), K, replace=False) for _ in range(T)])
            row = {
                "seq_id": pid * spp + j,
                "prompt_id": pid,
                "sample_idx": j,
                "prompt_token_ids": rng.integers(3, 97, P).astype(np.int32),
                "response_token_ids": rng.integers(3, 97, T).astype(np.int32),
                "logp_infer": -rng.random(T) * 3,
                "topk_ids_infer": list(top.astype(np.int32)),
                "topk_logp_infer": list(np.sort(-rng.random((T, K)) * 5, axis=1)[:, ::-1].astype(np.float32)),
                "finish_reason": "length",
                "text": f"text {pid}/{j}",
            }  # fmt: skip
            if masked:
                row["loss_mask"] = rng.random(T) < 0.7
                row["advantage"] = rng.standard_normal(T)
                row["step"] = 7 + pid
            rows.append(row)
    return pd.DataFrame(rows)


def make_run(path: Path, model: Path, *, masked: bool = False, temperature: float = 1.0,
             batch_tokens: int = 64, chunks: int = 2) -> Path:  # fmt: skip
    """A complete run of the tiny model, written as `measure` writes one: `chunks` chunks of
    3 prompts x 2 samples, rescored by `rescore_parts` with a small batch budget (several
    batches per part, so the part split matters)."""
    run = RunDir(path)
    path.mkdir(parents=True)
    parts = [_rollouts(3 * c, 3, 2, masked, c + 1) for c in range(chunks)]
    cfg = {"model": str(model), "temperature": temperature, "top_p": 1.0, "top_k": -1,
           "min_p": 0.0, "infer_engine": "vllm", "infer_dtype": "bfloat16",
           "train_dtype": "float32", "attn_implementation": "eager", "top_logprobs": K,
           "chunk_prompts": 3, "rescore_batch_tokens": batch_tokens, "device": "cpu",
           "samples_per_prompt": 2}  # fmt: skip
    meta = new_meta(
        "measure",
        config=cfg,
        sampling={k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p")},
        model={"name": "tiny", "path": str(model), "weights_sha256": weights_hash(str(model))},
        engines={"infer": {"engine": "vllm", "dtype": "bfloat16"},
                 "train": {"engine": "transformers", "dtype": "float32",
                           "attn_implementation": "eager"}},
    )  # fmt: skip
    run.write_meta(meta)
    for i, df in enumerate(parts):
        run.write_part(ROLLOUT, i, df)
    train = TrainSide(str(model), device=torch.device("cpu"), batch_tokens=batch_tokens, top_k=K)
    rescore_parts(run, chunks, train, Sampling(temperature=temperature))
    static = ["seq_id", "prompt_id", "sample_idx", "prompt_token_ids", "response_token_ids",
              "finish_reason", "text"]  # fmt: skip
    meta["summary"] = run.finalize(chunks, pd.concat([p[static] for p in parts], ignore_index=True))
    meta["status"] = STATUS_COMPLETE
    run.write_meta(meta)
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("rescore") / "run", tiny_model_dir)


def test_rollouts_are_rebuilt_as_measure_split_them(tiny_run: Path) -> None:
    from mismatch_cli.runs import open_run

    _, meta = open_run(tiny_run)
    parts = rollout_parts_of(tiny_run, meta)
    assert [p["prompt_id"].unique().tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    tok = read_tokens(tiny_run)
    first = parts[0].iloc[1]
    rows = tok[tok.seq_id == first.seq_id]
    np.testing.assert_array_equal(first.logp_infer, rows.logp_infer)
    np.testing.assert_array_equal(np.stack(first.topk_ids_infer), np.stack(rows.topk_ids_infer))
    assert "loss_mask" not in parts[0].columns


def test_same_settings_reproduce_logp_train_exactly(tiny_run: Path, tmp_path: Path) -> None:
    out = rescore_run(tiny_run, tmp_path / "again")
    a, b = read_tokens(tiny_run), read_tokens(out)
    for c in ("seq_id", "pos", "token_id", "logp_infer", "logp_train", "delta", "eps_hat",
              "p_train", "tv_coarse", "kl_qp_coarse"):  # fmt: skip
        np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=c)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["command"] == "rescore"
    assert meta["rescored_from"]["run"] == str(tiny_run)
    assert meta["rescored_from"]["changed"] == {}
    assert meta["rescored_from"]["weights_check"].startswith("not re-hashed")
    assert not (out / "parts").exists()


def test_a_changed_training_side_is_recorded(tiny_run: Path, tmp_path: Path) -> None:
    out = rescore_run(tiny_run, tmp_path / "bf16", RescoreOptions(train_dtype="bfloat16",
                      rescore_batch_tokens=1))  # fmt: skip
    meta = json.loads((out / "run.json").read_text())
    assert meta["rescored_from"]["changed"] == {
        "train_dtype": ["float32", "bfloat16"],
        "rescore_batch_tokens": [64, 1],
    }
    assert meta["engines"]["train"]["dtype"] == "bfloat16"
    a, b = read_tokens(tiny_run), read_tokens(out)
    np.testing.assert_array_equal(a["logp_infer"], b["logp_infer"])
    moved = np.abs(a["logp_train"] - b["logp_train"])
    assert moved.max() > 0 and moved.max() < 0.1  # bf16 moves it, a little


def test_a_float64_reference_on_the_first_sequences(tiny_run: Path, tmp_path: Path) -> None:
    """--train-dtype float64 --sequences N: the first N sequences, scored by a float64 forward
    pass; close to the float32 scores (the reference's own error), not equal to them."""
    out = rescore_run(tiny_run, tmp_path / "fp64", RescoreOptions(train_dtype="float64",
                      sequences=5))  # fmt: skip
    meta = json.loads((out / "run.json").read_text())
    assert meta["rescored_from"]["changed"]["train_dtype"] == ["float32", "float64"]
    assert meta["rescored_from"]["changed"]["sequences"] == [None, 5]
    a, b = read_tokens(tiny_run), read_tokens(out)
    first = sorted(a["seq_id"].unique())[:5]
    assert sorted(b["seq_id"].unique()) == first
    a = a[a["seq_id"].isin(first)].reset_index(drop=True)
    np.testing.assert_array_equal(a["token_id"], b["token_id"])
    d = np.abs(a["logp_train"].to_numpy(np.float64) - b["logp_train"].to_numpy(np.float64))
    assert d.max() < 1e-4  # float32 against float64: rounding only
    with pytest.raises(MismatchError, match="--infer-dtype must be one of"):
        rescore_run(tiny_run, tmp_path / "x", RescoreOptions(infer_side="hf-prefill",
                    infer_dtype="float64"))  # fmt: skip
    with pytest.raises(MismatchError, match="--sequences must be >= 1"):
        rescore_run(tiny_run, tmp_path / "x", RescoreOptions(sequences=0))


def test_hf_prefill_in_the_training_dtype_is_exactly_zero(tiny_run: Path, tmp_path: Path) -> None:
    out = rescore_run(tiny_run, tmp_path / "null",
                      RescoreOptions(infer_side="hf-prefill", infer_dtype="float32"))  # fmt: skip
    tok = read_tokens(out)
    assert (tok["delta"] == 0).all()
    for c in ("tv_coarse", "kl_qp_coarse", "kl_pq_coarse", "eps_hat"):
        assert (tok[c] == 0).all(), c
    meta = json.loads((out / "run.json").read_text())
    assert meta["engines"]["infer"] == {"engine": "hf", "mode": "prefill", "dtype": "float32",
                                        "attn_implementation": "eager"}  # fmt: skip
    assert meta["rescored_from"]["changed"]["infer_side"] == ["decode", "hf-prefill"]
    # and the inference side moved away from the stored (random) decode log-probs
    assert not np.array_equal(tok["logp_infer"], read_tokens(tiny_run)["logp_infer"])


def test_masked_positions_and_extras_survive(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = make_run(tmp_path / "masked", tiny_model_dir, masked=True)
    out = rescore_run(src, tmp_path / "again")
    a, b = read_tokens(src), read_tokens(out)
    assert (
        len(a)
        == len(b)
        < sum(len(v) for v in pd.read_parquet(src / "sequences.parquet")["response_token_ids"])
    )
    for c in ("seq_id", "pos", "logp_train", "logp_infer", "advantage", "step"):
        np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=c)
    assert a["step"].dtype == b["step"].dtype


def test_training_side_rescore_does_not_import_vllm(tiny_run: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mismatch_cli.rescore_run import rescore_run, RescoreOptions\n"
        f"rescore_run(Path({str(tiny_run)!r}), Path({str(tmp_path / 'x')!r}),"
        " RescoreOptions(train_dtype='bfloat16'))\n"
        "print('vllm' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_changed_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    src = make_run(tmp_path / "run", model)
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    w.write_bytes(bytes(data))
    import os
    import time

    later = time.time() + 5  # run.json times have a resolution of one second
    os.utime(w, (later, later))
    with pytest.raises(MismatchError, match="changed since the run was measured"):
        rescore_run(src, tmp_path / "out")


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(tiny_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli_in_process("rescore", str(tiny_run), "--out", str(tiny_run)),
                          "is the input run")  # fmt: skip
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    meta = json.loads((tiny_run / "run.json").read_text())
    (incomplete / "run.json").write_text(json.dumps({**meta, "status": "incomplete"}))
    assert_one_line_error(cli_in_process("rescore", str(incomplete), "--out", str(tmp_path / "o")),
                          "incomplete")  # fmt: skip
    assert_one_line_error(
        cli_in_process("rescore", str(tiny_run), "--out", str(tmp_path / "o"), "--infer-dtype",
                "float16"),
        "--infer-dtype needs --infer-side",
    )  # fmt: skip
    assert_one_line_error(
        cli_in_process(
            "rescore", str(tiny_run), "--out", str(tmp_path / "o"), "--train-dtype", "fp8"
        ),
        "--train-dtype must be one of",
    )
    assert not (tmp_path / "o").exists()


def test_vllm_prefill_is_refused_at_temperature_below_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = make_run(tmp_path / "t07", tiny_model_dir, temperature=0.7)
    proc = cli_in_process("rescore", str(src), "--out", str(tmp_path / "o"), "--infer-side",
                   "vllm-prefill", "--infer-dtype", "float32")  # fmt: skip
    assert_one_line_error(proc, "temperature 1 without truncation", "temperature 0.7")
    assert not (tmp_path / "o").exists()
