"""Write small verl `skip.rollout` dumps (gen_batch.dp) with verl 0.9.1's OWN code
(tests/data/verl/).

    python gen_verl_dumps.py OUT_ROOT    # writes OUT_ROOT/verl-0.9.1 and OUT_ROOT/verl-0.9.1-numpy

Needs Python 3.11 with `verl==0.9.1` installed `--no-deps` plus the few packages its
modules import at the top (torch CPU, tensordict 0.10.0, numpy, ray, transformers,
omegaconf, packaging); see README.md. Nothing of verl is stubbed or copied: the file is
written by `verl.utils.skip.rollout_skip.RolloutSkip.prepare_data` (the `skip.rollout`
dump: `DataProto.save_to_disk` = `pickle.dump(DataProto)` plus `meta.json`) on a
`DataProto` built the way verl's agent loop builds its output
(`AgentLoopWorker._agent_loop_postprocess` pads each row: prompt LEFT-padded to
`rollout.prompt_length`, response / response mask / log-probs RIGHT-padded to
`rollout.response_length`; `_postprocess` concatenates the rows into a TensorDict with
`prompts, responses, response_mask, input_ids, attention_mask, position_ids,
rollout_log_probs, rm_scores` and `__num_turns__` in `non_tensor_batch`). That per-row
padding needs a tokenizer (`tokenizer.pad`), so it is emulated here with the same pad
values (pad id, attention 0, log-prob 0.0); everything from the TensorDict on is verl's.
The second folder sets `VERL_DATAPROTO_SERIALIZATION_METHOD=numpy` (read by
`DataProto.__getstate__` at dump time), verl's other serialisation.

The dump is taken right after generation, so it holds the inference side only
(`rollout_log_probs`); `old_log_probs` are computed later and are not in it.

Completions come from a deterministic stand-in "model" (bigram log-probs that are exact
float32 values). `truth.json` is computed from the lists handed to verl, never read back
from its tensors: per completion the prompt ids, response ids, loss mask (tool spans 0)
and inference log-probs (0.0 on tool tokens, as verl's tool agent loop writes them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np

NUM = 24  # completions in the batch
PROMPT_LEN = 16  # rollout.prompt_length
RESP_LEN = 40  # rollout.response_length
PAD_ID = 2  # the tokenizer's pad id, also EOS: some responses end with it
STEP = 5
SEED = 91
VOCAB = 97  # ids below the test suite's tiny model vocabulary, so the import can rescore


def lp_infer(prev: int, tok: int) -> float:
    """The emulated engine: log p(tok | prev), an exact float32 value."""
    return (
        -(((prev * 31 + tok * 17) % 997) + 1) / 128.0 + (((prev * 7 + tok * 13) % 41) - 20) / 4096.0
    )


def make_samples() -> list[dict[str, Any]]:
    """Responses of different lengths (1 and the maximum included), some ending with EOS,
    some with a tool span inside (response_mask 0, log-prob 0.0)."""
    rng = np.random.default_rng(SEED)
    out = []
    for i in range(NUM):
        p = int(rng.integers(2, PROMPT_LEN + 1))
        r = {0: RESP_LEN, 1: 1}.get(i, int(rng.integers(2, RESP_LEN + 1)))
        prompt = rng.integers(3, VOCAB, p).tolist()
        resp = rng.integers(3, VOCAB, r).tolist()
        if i % 3 == 0:
            resp[-1] = PAD_ID
        mask = [1] * r
        if r >= 10 and i % 4 == 2:  # a tool response inside the completion
            a = int(rng.integers(1, r - 5))
            for k in range(a, a + 4):
                mask[k] = 0
        prev = [prompt[-1], *resp[:-1]]
        infer = [lp_infer(a, b) if m else 0.0 for a, b, m in zip(prev, resp, mask, strict=True)]
        out.append({"prompt": prompt, "response": resp, "mask": mask, "logp_infer": infer,
                    "turns": 1 + 2 * (0 in mask), "score": float(i % 2)})  # fmt: skip
    return out


def padded_row(s: dict[str, Any], torch: Any) -> NS:
    """One row as `_agent_loop_postprocess` pads it (the tokenizer.pad step emulated)."""
    p, r = len(s["prompt"]), len(s["response"])
    pr = torch.tensor([[PAD_ID] * (PROMPT_LEN - p) + s["prompt"]])
    pa = torch.tensor([[0] * (PROMPT_LEN - p) + [1] * p])
    rr = torch.tensor([s["response"] + [PAD_ID] * (RESP_LEN - r)])
    ra = torch.tensor([[1] * r + [0] * (RESP_LEN - r)])
    rm = torch.tensor([s["mask"] + [0] * (RESP_LEN - r)]) * ra
    lp = torch.tensor(s["logp_infer"] + [0.0] * (RESP_LEN - r)).unsqueeze(0)
    att = torch.cat([pa, ra], dim=1)
    pos = torch.clip(torch.cumsum(att, dim=-1) - 1, min=0, max=None) * att
    return NS(prompt_ids=pr, response_ids=rr, response_mask=rm, attention_mask=att,
              input_ids=torch.cat([pr, rr], dim=1), position_ids=pos, response_logprobs=lp,
              reward_score=s["score"], num_turns=s["turns"])  # fmt: skip


def build(samples: list[dict[str, Any]]) -> Any:
    """The DataProto verl's `_postprocess` returns for these rows."""
    import torch
    from tensordict import TensorDict
    from verl.protocol import DataProto

    rows = [padded_row(s, torch) for s in samples]
    cat = lambda k: torch.cat([getattr(x, k) for x in rows], dim=0)  # noqa: E731
    batch = TensorDict({"prompts": cat("prompt_ids"), "responses": cat("response_ids"),
                        "response_mask": cat("response_mask"), "input_ids": cat("input_ids"),
                        "attention_mask": cat("attention_mask"),
                        "position_ids": cat("position_ids"),
                        "rollout_log_probs": cat("response_logprobs")},
                       batch_size=len(rows))  # fmt: skip
    plen = batch["prompts"].size(1)
    rlen = batch["attention_mask"][:, plen:].sum(dim=1) - 1
    rm_scores = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
    rm_scores[torch.arange(len(rows)), rlen] = torch.tensor([x.reward_score for x in rows])
    batch["rm_scores"] = rm_scores
    non_tensor = {"__num_turns__": np.array([x.num_turns for x in rows], dtype=np.int32),
                  "data_source": np.array(["gsm8k" if i % 2 else "math" for i in range(len(rows))],
                                          dtype=object)}  # fmt: skip
    return DataProto(batch=batch, non_tensor_batch=non_tensor, meta_info={})


def dump(proto: Any, root: Path) -> Path:
    """verl's own skip.rollout dump of `proto` as step STEP under `root`."""
    from omegaconf import OmegaConf
    from verl.utils.skip.rollout_skip import RolloutSkip

    gcfg = OmegaConf.create({"trainer": {"experiment_name": "exp", "project_name": "proj"},
                             "actor_rollout_ref": {"rollout": {"n": 4}},
                             "data": {"train_batch_size": NUM // 4, "max_prompt_length": PROMPT_LEN,
                                      "max_response_length": RESP_LEN}})  # fmt: skip
    lcfg = NS(action="cache", enable=True, dump_dir=str(root), steps=[STEP])
    skip = RolloutSkip(lcfg, gcfg)
    skip.prepare_data(STEP, proto)
    return skip._get_step_dump_dir(STEP) / RolloutSkip.gen_batch_name


def main(out_root: Path) -> None:
    import tensordict
    import torch
    import verl

    samples = make_samples()
    for folder, method in (("verl-0.9.1", None), ("verl-0.9.1-numpy", "numpy")):
        if method:
            os.environ["VERL_DATAPROTO_SERIALIZATION_METHOD"] = method
        else:
            os.environ.pop("VERL_DATAPROTO_SERIALIZATION_METHOD", None)
        root = out_root / folder
        path = dump(build(samples), root)
        truth = {"release": folder, "installed_version": verl.__version__,
                 "serialization": method or "torch.save", "torch": torch.__version__,
                 "tensordict": tensordict.__version__, "numpy": np.__version__,
                 "file": str(path.relative_to(root)), "step": STEP, "pad_token_id": PAD_ID,
                 "completions": [{"row": i, "prompt_token_ids": s["prompt"],
                                  "response_token_ids": s["response"], "loss_mask": s["mask"],
                                  "logp_infer": s["logp_infer"]}
                                 for i, s in enumerate(samples)]}  # fmt: skip
        (root / "truth.json").write_text(json.dumps(truth, separators=(",", ":")))
        print(folder, path, path.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
