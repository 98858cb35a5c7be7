"""Write a small OpenRLHF `tokens` dump from `Experience` batches built with OpenRLHF's
OWN code (tests/data/openrlhf/), through docs/import.md's OpenRLHF hook.

    python gen_openrlhf_dumps.py OUT_DIR DOCS_IMPORT_MD   # needs `openrlhf==0.11.2`

Needs Python 3.11 with the wheel installed `--no-deps` plus torch, numpy, transformers and
pylatexenc (what `openrlhf.trainer.ppo_utils.experience` imports; see README.md).
OpenRLHF's code used as is: `Experience` and `Experience.concat_experiences` (how
`split_rollout_samples` batches rollout samples, right-padded per micro-batch, sequences
with the pad id) and `SamplesGenerator._process_response_into_experience`, which turns one
engine response (`observation_tokens`, `action_ranges`, `rollout_log_probs` as
`openrlhf/utils/agent.py` builds them, 0.0 on prompt and tool-feedback tokens) into an
Experience with the one-token shift. Its module imports vllm and ray, so that one method
is compiled from the installed `samples_generator.py` source with `ast` (globals: torch,
Experience; it does not use `self`). Emulated: the vLLM engine and the actor forward
(`action_log_probs[b, j]` = the policy's log-prob of `sequences[b, j + 1]`, every column,
as the actor returns it) with bigram "models" whose log-probs are exact float32 values,
and the advantages (reward on each action token). The hook (the docs block tagged
`openrlhf-hook`) is run unchanged on the batches.

`truth.json` is computed from the lists handed to OpenRLHF, never from its tensors.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

NUM = 12  # samples
MICRO = 4  # rollout.micro_batch_size: 3 Experience batches, each right-padded to its own max
PAD_ID = 0
STEP = 3
SEED = 11
VOCAB = 97  # ids below the test suite's tiny model vocabulary


def lp_train(prev: int, tok: int) -> float:
    """The emulated policy: log p(tok | prev), an exact float32 value (k / 128)."""
    return -(((prev * 31 + tok * 17) % 997) + 1) / 128.0


def lp_infer(prev: int, tok: int) -> float:
    """The emulated engine: the policy plus a small mismatch (exact in float32)."""
    return lp_train(prev, tok) + (((prev * 7 + tok * 13) % 41) - 20) / 4096.0


def make_responses() -> list[dict[str, Any]]:
    """Engine responses as openrlhf/utils/agent.py returns them: single-turn ones of
    different lengths (1 included) and multi-turn ones with tool feedback between two
    actions (outside action_ranges, log-prob 0.0)."""
    rng = np.random.default_rng(SEED)
    out = []
    for i in range(NUM):
        prompt = rng.integers(3, VOCAB, int(rng.integers(2, 9))).tolist()
        obs, ranges = list(prompt), []
        turns = 2 if i % 3 == 1 else 1
        for t in range(turns):
            n = {0: 1}.get(i, int(rng.integers(2, 15)))
            start = len(obs)
            obs += rng.integers(3, VOCAB, n).tolist()
            ranges.append((start, len(obs)))
            if t < turns - 1:
                obs += rng.integers(3, VOCAB, 3).tolist()  # tool feedback
        in_action = [any(a <= k < b for a, b in ranges) for k in range(len(obs))]
        lps = [lp_infer(obs[k - 1], obs[k]) if in_action[k] else 0.0 for k in range(len(obs))]
        out.append({"prompt": f"p{i}", "label": "", "observation_tokens": obs,
                    "action_ranges": ranges, "rollout_log_probs": lps, "reward": float(i % 2),
                    "n_prompt": len(prompt)})  # fmt: skip
    return out


def process_method(Experience: Any) -> Any:
    """`_process_response_into_experience` compiled from the installed wheel's source."""
    import openrlhf
    import torch

    src = Path(openrlhf.__file__).parent / "trainer" / "ppo_utils" / "samples_generator.py"
    tree = ast.parse(src.read_text())
    fn = next(n for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef) and n.name == "_process_response_into_experience")  # fmt: skip
    fn.returns = None
    for a in fn.args.args:
        a.annotation = None
    mod = ast.Module(body=[fn], type_ignores=[])
    env: dict[str, Any] = {"torch": torch, "Experience": Experience}
    exec(compile(ast.fix_missing_locations(mod), str(src), "exec"), env)
    return env["_process_response_into_experience"]


def hook(docs: Path) -> Any:
    """docs/import.md's `dump_experiences`, unchanged."""
    text = docs.read_text()
    block = re.search(r"<!-- test: openrlhf-hook[^>]*-->\s*```python\n(.*?)\n```", text, re.S)
    env: dict[str, Any] = {}
    exec(block.group(1), env)
    return env["dump_experiences"]


def main(out: Path, docs: Path) -> None:
    from importlib.metadata import version

    import openrlhf
    import torch
    from openrlhf.trainer.ppo_utils.experience import Experience

    responses = make_responses()
    process = process_method(Experience)
    samples = [process(None, r, max_len=2048) for r in responses]
    batches = [Experience.concat_experiences(samples[i : i + MICRO], PAD_ID)
               for i in range(0, NUM, MICRO)]  # fmt: skip
    for e in batches:  # the actor forward and the advantages, emulated
        seq = e.sequences.tolist()
        e.action_log_probs = torch.tensor(
            [[lp_train(s[j], s[j + 1]) for j in range(len(s) - 1)] for s in seq],
            dtype=torch.float32,
        )
        e.advantages = e.rewards.float()[:, None] * e.action_mask.float()
    out.mkdir(parents=True, exist_ok=True)
    hook(docs)(batches, STEP, str(out))
    comps = []
    for r in responses:
        obs, p = r["observation_tokens"], r["n_prompt"]
        acts = [any(a <= k < b for a, b in r["action_ranges"]) for k in range(len(obs))]
        comps.append({"prompt_token_ids": obs[:p], "response_token_ids": obs[p:],
                      "loss_mask": [int(m) for m in acts[p:]],
                      "logp_infer": r["rollout_log_probs"][p:],
                      "logp_train": [lp_train(obs[k - 1], obs[k]) for k in range(p, len(obs))],
                      "advantage": r["reward"]})  # fmt: skip
    truth = {"release": f"openrlhf-{version('openrlhf')}", "installed_version": version("openrlhf"),
             "module": Experience.__module__, "torch": torch.__version__, "numpy": np.__version__,
             "file": f"step_{STEP}_rank_0.jsonl", "step": STEP, "pad_token_id": PAD_ID,
             "micro_batch_size": MICRO, "completions": comps}  # fmt: skip
    assert openrlhf.__file__
    (out / "truth.json").write_text(json.dumps(truth, separators=(",", ":")))
    print(out, (out / truth["file"]).stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
