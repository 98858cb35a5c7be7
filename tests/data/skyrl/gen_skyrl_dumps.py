"""Write small SkyRL training-batch dumps with each release's OWN code (tests/data/skyrl/).

    python gen_skyrl_dumps.py skyrl-0.4.0 OUT_DIR        # needs `skyrl==0.4.0` importable
    python gen_skyrl_dumps.py skyrl_train-0.3.1 OUT_DIR  # needs `skyrl-train==0.3.1`

Needs Python 3.12 with the release's wheel installed `--no-deps`, plus torch, numpy,
jaxtyping, transformers, loguru, cloudpathlib (see README.md). The trainer modules
themselves import ray and cannot load without a cluster stack, so the two trainer methods
the dump passes through (`convert_to_training_input`, and 0.3.1's `pad_batch`) are taken
from the installed release's `trainer.py` source with `ast` and run on a stand-in `self`
(config values only); the batch tensors, the padding and the pickle (`TensorBatch.save`)
are the release's own. The policy forward is emulated the way SkyRL's model wrapper
slices it (`log_probs[:, -num_actions - 1 : -1]` of the whole left-padded row), with a
bigram "model" whose log-probs are exact float32 values, so padding columns hold
non-zero values exactly as a real forward's would.

`truth.json` is computed from the lists handed to SkyRL, never from its tensors: per
completion the prompt ids, response ids, loss mask, inference and trainer log-probs.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np

NUM = 42  # real completions; dp_size 4 pads 2 rows
DP = 4
PAD_ID = 2  # also the EOS id: some responses end with it (as Qwen's base models do)
SEED = 23


def lp_train(prev: int, tok: int) -> float:
    """The emulated policy: log p(tok | prev), an exact float32 value (k / 128)."""
    return -(((prev * 31 + tok * 17) % 997) + 1) / 128.0


def lp_infer(prev: int, tok: int) -> float:
    """The emulated engine: the policy plus a small mismatch (exact in float32)."""
    return lp_train(prev, tok) + (((prev * 7 + tok * 13) % 41) - 20) / 4096.0


def make_samples() -> list[dict[str, Any]]:
    """Completions of different lengths: one empty, one of length 1, one at the max,
    some ending with EOS (= the pad id), some with a tool span (loss mask 0, inference
    log-prob 0.0 as SkyRL's generators write for observation tokens)."""
    rng = np.random.default_rng(SEED)
    out = []
    for i in range(NUM):
        p = int(rng.integers(2, 13))
        r = {0: 32, 1: 1, 5: 0}.get(i, int(rng.integers(2, 33)))
        prompt = rng.integers(3, 1000, p).tolist()
        resp = rng.integers(3, 1000, r).tolist()
        if r and i % 3 == 0:
            resp[-1] = PAD_ID
        mask = [1] * r
        if r >= 8 and i % 4 == 1:  # a tool call's output inside the response
            a = int(rng.integers(1, r - 4))
            for k in range(a, a + 3):
                mask[k] = 0
        prev = [prompt[-1], *resp[:-1]][:r]
        infer = [lp_infer(a, b) if m else 0.0 for a, b, m in zip(prev, resp, mask, strict=True)]
        train = [lp_train(a, b) for a, b in zip(prev, resp, strict=True)]
        out.append({"prompt": prompt, "response": resp, "loss_mask": mask,
                    "logp_infer": infer, "logp_train": train,
                    "advantage": float(rng.integers(-8, 9)) / 8})  # fmt: skip
    return out


def methods(trainer_py: Path, names: tuple[str, ...], env: dict[str, Any]) -> dict[str, Any]:
    """The trainer's methods `names`, compiled from its source (annotations dropped), with
    the module's own imports as globals where they import (ray-bound ones are skipped)."""
    tree = ast.parse(trainer_py.read_text())
    g: dict[str, Any] = {"__name__": "skyrl_trainer_methods", **env}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:  # one name at a time: a failing one skips only itself
                one = type(node)(**{**node.__dict__, "names": [alias]})
                try:
                    exec(compile(ast.Module([one], []), str(trainer_py), "exec"), g)
                except Exception:
                    pass
    g["logger"] = logging.getLogger("skyrl")
    found: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            node.decorator_list = [
                d for d in node.decorator_list if "no_grad" not in ast.unparse(d)
            ]
            node.returns = None
            for a in (*node.args.args, *node.args.kwonlyargs):
                a.annotation = None
            exec(compile(ast.Module([node], []), str(trainer_py), "exec"), g)
            found[node.name] = g[node.name]
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"{trainer_py}: no method {sorted(missing)}")
    return found


def forward(sequences: Any, num_actions: int) -> Any:
    """SkyRL's policy forward output: log p of token j+1 at column j of the whole row, then
    `log_probs[:, -num_actions - 1 : -1]` (model_wrapper.py)."""
    import torch

    seq = sequences.numpy()
    full = np.zeros(seq.shape, np.float32)
    for i in range(seq.shape[0]):
        for j in range(seq.shape[1] - 1):
            full[i, j] = lp_train(int(seq[i, j]), int(seq[i, j + 1]))
    return torch.from_numpy(full)[:, -num_actions - 1 : -1].contiguous()


def build(release: str, samples: list[dict[str, Any]]) -> Any:
    """The TrainingInputBatch the release dumps (`trainer.dump_data_batch: true`)."""
    import torch

    gen = {
        "prompt_token_ids": [s["prompt"] for s in samples],
        "response_ids": [s["response"] for s in samples],
        "rewards": [[0.0] * (len(s["response"]) - 1) + [1.0] if s["response"] else []
                    for s in samples],
        "loss_masks": [s["loss_mask"] for s in samples],
        "rollout_logprobs": [s["logp_infer"] for s in samples],
    }  # fmt: skip
    uids = [f"p{i // 2}" for i in range(len(samples))]
    if release == "skyrl_train-0.3.1":
        tb = importlib.import_module("skyrl_train.training_batch")
        pre = importlib.import_module("skyrl_train.dataset.preprocess")
        trainer_py = Path(tb.__file__).parent / "trainer.py"
        env = {**vars(pre), "TrainingInputBatch": tb.TrainingInputBatch}
        m = methods(trainer_py, ("convert_to_training_input", "pad_batch"), env)
        self = NS(
            tokenizer=NS(pad_token_id=PAD_ID),
            cfg=NS(trainer=NS(algorithm=NS(use_tis=True)),
                   generator=NS(step_wise_trajectories=False)),
            policy_model=NS(actor_infos=[NS(rank=NS(dp_size=DP))]),
            critic_model=None,
            ref_model=None,
        )  # fmt: skip
        self.pad_batch = lambda ti: m["pad_batch"](self, ti)
        batch = m["convert_to_training_input"](self, gen, uids)
    elif release == "skyrl-0.4.0":
        tb = importlib.import_module("skyrl.backends.skyrl_train.training_batch")
        trainer_py = Path(importlib.import_module("skyrl.train").__file__).parent / "trainer.py"
        m = methods(trainer_py, ("convert_to_training_input",), {})
        opc = NS(tis_ratio_type="token", sequence_mask_metric=None)
        self = NS(
            tokenizer=NS(pad_token_id=PAD_ID),
            cfg=NS(trainer=NS(algorithm=NS(off_policy_correction=opc, max_seq_len=4096),
                              train_batch_size=len(samples) // 2, policy_mini_batch_size=len(samples) // 2,
                              critic=NS(model=NS(path=None))),
                   generator=NS(n_samples_per_prompt=2, step_wise_trajectories=False)),
            dispatch=NS(get_lcm_dp_size=lambda: DP),
            all_metrics={},
        )  # fmt: skip
        batch = m["convert_to_training_input"](self, gen, uids)
    else:
        raise SystemExit(f"unknown release {release}")
    # fwd_logprobs_values_reward: policy and reference forwards (no critic)
    R = batch.metadata["response_length"]
    batch["action_log_probs"] = forward(batch["sequences"], R)
    batch["base_action_log_probs"] = forward(batch["sequences"], R) - 0.125
    batch["values"] = None
    # compute_advantages_and_returns (GRPO: one scalar per sequence on its response tokens)
    pad = batch.metadata["pad_size"]
    adv = torch.tensor([s["advantage"] for s in samples] + [0.0] * pad, dtype=torch.float32)
    batch["advantages"] = adv[:, None] * batch["response_mask"].float()
    batch["returns"] = batch["advantages"].clone()
    batch.pop("rewards")
    batch.metadata.pop("uids")
    batch.metadata.pop("is_last_step", None)
    return batch


def main() -> None:
    release, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    samples = make_samples()
    batch = build(release, samples)
    step = 7
    path = out / f"global_step_{step}_training_input.pkl"
    batch.save(str(path))  # TensorBatch.save: pickle.dump(self, f)
    version = importlib.metadata.version(release.split("-")[0].replace("_", "-"))
    truth = {
        "release": release,
        "installed_version": version,
        "file": path.name,
        "step": step,
        "pad_size": int(batch.metadata["pad_size"]),
        "pad_token_id": PAD_ID,
        "completions": [
            {"row": i, "prompt_token_ids": s["prompt"], "response_token_ids": s["response"],
             "loss_mask": s["loss_mask"], "logp_infer": s["logp_infer"],
             "logp_train": s["logp_train"], "advantage": s["advantage"]}
            for i, s in enumerate(samples)
        ],
    }  # fmt: skip
    (out / "truth.json").write_text(json.dumps(truth, separators=(",", ":")) + "\n")
    print(
        f"{path}: {path.stat().st_size} bytes, {len(samples)} completions, pad {truth['pad_size']}"
    )


if __name__ == "__main__":
    import importlib.metadata

    main()
