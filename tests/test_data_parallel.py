"""`measure --data-parallel N`: N vLLM engines as Ray actors over contiguous shards of the
prompts. The shard plan and the CPU binds are checked as functions; bad values are one line;
then ONE real data-parallel run of the default model (2 engines, 4 prompts x 2 samples x 32
tokens), interrupted by an engine that fails and resumed without regenerating the finished
shard, equals two single-engine runs over the same prompt shards (token ids, inference and
training log-probs, per sequence; exactly where vLLM's CPU kernels are deterministic, within
their noise elsewhere) and, in the first token of every sequence, one engine over all
prompts (other vLLM batches: bf16 batch noise may make a sequence diverge later)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mismatch_cli.cluster import DP_FAULT_ENV, cpu_bind, engine_shape
from mismatch_cli.config import MeasureConfig
from mismatch_cli.errors import MismatchError
from mismatch_cli.pipeline import plan_chunks, plan_prompt_shards
from mismatch_cli.prompts import builtin_prompts
from mismatch_cli.runs import read_sequences, read_tokens

from .conftest import ROOT, SMALL, assert_one_line_error, run_cli


def test_prompt_shards_are_contiguous_balanced_and_never_empty() -> None:
    costs = [10, 10, 10, 10, 40]  # the last prompt alone is as dear as the first four
    assert plan_prompt_shards(costs, 2) == [(0, 4), (4, 5)]
    assert plan_prompt_shards([1] * 7, 3) == [(0, 2), (2, 5), (5, 7)]  # cuts nearest k/3
    assert plan_prompt_shards([1] * 5, 1) == [(0, 5)]
    # a dear prompt first cannot leave a later shard empty
    assert plan_prompt_shards([100, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]
    for n in range(1, 6):
        shards = plan_prompt_shards([3, 1, 4, 1, 5], n)
        assert len(shards) == n and shards[0][0] == 0 and shards[-1][1] == 5
        assert all(a < b for a, b in shards)
        assert all(shards[k][1] == shards[k + 1][0] for k in range(n - 1))


def test_one_shard_gives_measures_usual_chunks() -> None:
    assert plan_chunks([(0, 5)], 2) == [[0, 1], [2, 3], [4]]
    # each shard is chunked on its own: no chunk spans two engines
    assert plan_chunks([(0, 3), (3, 5)], 2) == [[0, 1], [2], [3, 4]]


def test_each_engine_binds_its_own_cores() -> None:
    assert [cpu_bind(i, 1, 1, 2) for i in range(2)] == ["0", "1"]
    assert cpu_bind(1, 4, 1, 16) == "4-7"
    assert cpu_bind(0, 4, 2, 16) == "0-1|2-3"  # one core list per tensor-parallel rank
    assert cpu_bind(1, 3, 2, 16) == "3-4|5"
    assert engine_shape(2, 1, {"CPU": 2.0}) == (0.0, 1)
    assert engine_shape(2, 1, {"CPU": 16.0}) == (0.0, 8)
    assert engine_shape(4, 2, {"CPU": 8.0, "GPU": 8.0}) == (2.0, 1)
    with pytest.raises(MismatchError, match="has 2 CPU"):
        engine_shape(3, 1, {"CPU": 2.0})
    with pytest.raises(MismatchError, match="do not fit"):
        engine_shape(3, 2, {"CPU": 64.0, "GPU": 4.0})


def test_bad_data_parallel_values_are_one_line(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    base = ["measure", "--num-prompts", "2", "--max-tokens", "4", "--out", out]
    for n in ("0", "-1"):
        proc = run_cli(*base, "--data-parallel", n)
        assert_one_line_error(proc, f"--data-parallel must be >= 1, got {n}")
    proc = run_cli(*base, "--data-parallel", "2", "--infer-engine", "hf")
    assert_one_line_error(proc, "--data-parallel", "--infer-engine vllm")
    proc = run_cli(*base, "--ray-address", "auto")
    assert_one_line_error(proc, "--ray-address needs --data-parallel")
    with pytest.raises(MismatchError, match="--data-parallel must be >= 1"):
        MeasureConfig(data_parallel=0).validate()
    if _has_ray():
        proc = run_cli(*base, "--data-parallel", "3")
        assert_one_line_error(proc, "--data-parallel 3 exceeds the number of prompts (2)")
    assert not Path(out).exists()


def test_without_ray_installed_it_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from mismatch_cli.cli import main\n"
        f"sys.argv = ['mismatch', 'measure', '--num-prompts', '2', '--out', "
        f"{str(tmp_path / 'run')!r}, '--data-parallel', '2']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(proc, "--data-parallel needs Ray", "mismatch-cli[ray]")
    assert not (tmp_path / "run").exists()


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ the real engines
SAMPLES = 2  # SMALL's --samples-per-prompt


def _by_prompt(run: Path, offset: int = 0) -> pd.DataFrame:
    """A run's rollouts per (prompt, sample): token ids, finish reason, and its tokens'
    inference and training log-probs, with prompt ids shifted by `offset` (a shard run's
    prompt 0 is the data-parallel run's prompt `offset`)."""
    seqs = read_sequences(run)[["seq_id", "prompt_id", "sample_idx", "response_token_ids",
                                "finish_reason"]]  # fmt: skip
    toks = read_tokens(run, columns=["seq_id", "pos", "logp_infer", "logp_train"])
    toks = toks.sort_values(["seq_id", "pos"])
    per = toks.groupby("seq_id").agg(list).reset_index()
    df = seqs.merge(per, on="seq_id", how="left")
    df["prompt_id"] = df["prompt_id"] + offset
    df["response_token_ids"] = df["response_token_ids"].map(lambda a: list(map(int, a)))
    return df.drop(columns="seq_id").sort_values(["prompt_id", "sample_idx"]).reset_index(drop=True)


@pytest.mark.integration
def test_data_parallel_run_equals_single_engine_runs_over_its_shards(
    vllm_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    out = tmp_path / "dp"
    cmd = ["measure", *SMALL, "--enforce-eager", "--data-parallel", "2", "--out", str(out)]
    # shard 1's engine fails: the run stops in one line once shard 0 is written
    failed = subprocess.run(
        [sys.executable, "-m", "mismatch_cli", *cmd], capture_output=True, text=True,
        cwd=ROOT, timeout=900, env={**_env(), DP_FAULT_ENV: "1"},
    )  # fmt: skip
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "data-parallel shard 1 (prompts " in errors[0], failed.stderr
    assert "--resume" in errors[0]
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] != "complete"
    rec = meta["data_parallel"]
    assert [s["status"] for s in rec["shards"]] == ["done", "failed"]
    binds = [w["cpu_bind"] for w in rec["workers"]]
    assert len(set(binds)) == 2, binds  # each engine on its own core(s)
    bind_of = {w["worker"]: w["cpu_bind"] for w in rec["workers"]}
    shard_bind = {0: bind_of[rec["shards"][0]["worker"]]}

    # --resume: only shard 1 is generated again; shard 0's parts are kept as they are
    proc = run_cli("measure", "--resume", "--out", str(out), check=True)
    assert "Traceback" not in proc.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["data_parallel"] == 2
    rec = meta["data_parallel"]
    assert rec["size"] == 2 and [s["status"] for s in rec["shards"]] == ["done before", "done"]
    shards = [tuple(s["prompts"]) for s in rec["shards"]]
    assert shards[0][0] == 0 and shards[0][1] == shards[1][0] and shards[1][1] == 4
    assert [w["worker"] for w in rec["workers"]] == [1]
    shard_bind[1] = rec["workers"][0]["cpu_bind"]
    a, b = shards[1]
    assert rec["workers"][0]["completions"] == (b - a) * SAMPLES  # shard 1's, no more
    dp = _by_prompt(out)
    assert len(dp) == 4 * SAMPLES and dp["response_token_ids"].map(len).gt(0).all()

    # two single-engine runs over the same shards: a prompt file each, the seed moved so
    # each prompt keeps its seed (seed + prompt_id x samples_per_prompt), each engine bound to
    # the core of the data-parallel engine that generated its shard (the same kernels on the
    # same thread count), both at once (one core each)
    texts = builtin_prompts()
    procs, runs = [], []
    for k, (a, b) in enumerate(shards):
        pfile = tmp_path / f"shard{k}.jsonl"
        pfile.write_text("".join(json.dumps({"prompt": p.content}) + "\n" for p in texts[a:b]))
        runs.append(tmp_path / f"one{k}")
        cmd = ["measure", *SMALL, "--enforce-eager", "--prompts", str(pfile),
               "--seed", str(a * SAMPLES), "--out", str(runs[-1])]  # fmt: skip
        env = {**_env(), "VLLM_CPU_OMP_THREADS_BIND": shard_bind[k]}
        procs.append(subprocess.Popen([sys.executable, "-m", "mismatch_cli", *cmd], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
    finally:  # a failed run does not leave the other one's engine running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    shard_runs = pd.concat(
        [_by_prompt(run, offset=a) for run, (a, _) in zip(runs, shards, strict=True)],
        ignore_index=True,
    )
    keys = ["prompt_id", "sample_idx"]
    assert dp[keys].equals(shard_runs[keys])
    # Exactly equal on an AVX2 EPYC (2026-12-03). On a Xeon with AMX (2026-12-04) vLLM's CPU
    # kernels are not run-to-run deterministic: the same engine on the same prompts changed
    # the log-probs of 1 sequence in 8 (by up to 0.04 nats) in one try, and flipped a sampled
    # token of 1 in 8 in another. So: the same first token everywhere (a wrong seed or prompt
    # changes nearly every one), nearly every sequence identical, and where the tokens are the
    # same, the same training-side log-probs and inference log-probs within bf16 noise.
    pairs = list(zip(dp["response_token_ids"], shard_runs["response_token_ids"], strict=True))
    assert all(x[0] == y[0] for x, y in pairs)
    same = [x == y for x, y in pairs]
    assert sum(same) >= len(pairs) * 3 // 4, same
    for i in [i for i, ok in enumerate(same) if ok]:
        assert dp["finish_reason"][i] == shard_runs["finish_reason"][i]
        np.testing.assert_allclose(dp["logp_train"][i], shard_runs["logp_train"][i], atol=1e-4)
        d = np.abs(np.subtract(dp["logp_infer"][i], shard_runs["logp_infer"][i]))
        assert np.median(d) < 0.01 and d.max() < 0.5, d

    # one engine over all four prompts in one chunk: other vLLM batches (4 prompts, not 2 + 2),
    # so bf16 batch noise may flip a sampled token and the sequence diverges from there (7 of
    # 8 identical on an AVX2 EPYC; 3 of 8 on a Xeon with AMX, whose kernels also vary from run
    # to run). A wrong seed or prompt changes the first token of nearly every sequence.
    one = _by_prompt(vllm_run)
    assert dp[["prompt_id", "sample_idx"]].equals(one[["prompt_id", "sample_idx"]])
    pairs = list(zip(dp["response_token_ids"], one["response_token_ids"], strict=True))
    assert all(x[0] == y[0] for x, y in pairs)  # the first token: the same seed, same prompt


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
