"""The slime plug-in (`integrations.slime.monitor_tis`) called the way slime calls its custom
TIS function, its metrics reduced the way slime reduces them: both vendored from THUDM/slime
624b824 (slime/backends/megatron_utils/loss.py `policy_loss_function` and `loss_function`,
cp_utils.py `get_sum_of_sample_mean` with cp_size 1, observability/train_metric_utils.py
`reduce_train_step_metrics`)."""

from __future__ import annotations

import math
import warnings
from argparse import Namespace
from collections.abc import Callable

import numpy as np
import pytest
import torch

from mismatch_cli.correction_rules import rule_icepop, rule_tis_token
from mismatch_cli.integrations import slime as S
from mismatch_cli.integrations.common import MonitorWarning
from mismatch_cli.monitor import StepMonitor

# ---------------------------------------------------------------- vendored from slime 624b824


def get_sum_of_sample_mean(
    total_lengths: list[int],
    response_lengths: list[int],
    loss_masks: list[torch.Tensor],
    sample_denoms: list[torch.Tensor] | torch.Tensor | None = None,
    calculate_per_token_loss: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """cp_utils.get_sum_of_sample_mean, the cp_size == 1 branch, verbatim."""
    if sample_denoms is None:
        sample_denoms = [m.sum() for m in loss_masks]

    def sum_of_sample_mean(x: torch.Tensor) -> torch.Tensor:
        return sum(
            [
                (x_i * loss_mask_i).sum() / torch.clamp_min(denom, 1)
                for x_i, loss_mask_i, denom in zip(
                    x.split(response_lengths, dim=0), loss_masks, sample_denoms, strict=False
                )
            ]
        )

    def sum_of_token(x: torch.Tensor) -> torch.Tensor:
        return sum(
            [
                (x_i * loss_mask_i).sum()
                for x_i, loss_mask_i in zip(
                    x.split(response_lengths, dim=0), loss_masks, strict=False
                )
            ]
        )

    return sum_of_sample_mean if not calculate_per_token_loss else sum_of_token


def slime_micro_batch(fn, args, mb: dict, per_token: bool = False):
    """One micro-batch through loss.py: the TIS call (keyword arguments), each metric reduced
    with the pre-RS `sum_of_sample_mean`, the log values stacked as `loss_function` does."""
    sum_of_sample_mean = get_sum_of_sample_mean(
        mb["total_lengths"],
        mb["response_lengths"],
        mb["loss_masks"],
        mb["rollout_mask_sums"],
        per_token,
    )
    tis_kwargs = {
        "args": args,
        "pg_loss": mb["pg_loss"],
        "train_log_probs": mb["log_probs"],
        "rollout_log_probs": mb["rollout_log_probs"],
        "loss_masks": mb["loss_masks"],
        "total_lengths": mb["total_lengths"],
        "response_lengths": mb["response_lengths"],
    }
    pg_loss, masks, tis_metrics = fn(**tis_kwargs)
    log = {k: sum_of_sample_mean(v) for k, v in tis_metrics.items()}
    num_tokens = sum([torch.clamp_min(m.sum(), 1) for m in mb["loss_masks"]])
    values = torch.tensor([num_tokens if per_token else 0, *log.values()])
    return pg_loss, masks, {"keys": list(log.keys()), "values": values}


def reduce_train_step_metrics(losses_reduced, per_token: bool, step_global_batch_size: int):
    """train_metric_utils.reduce_train_step_metrics on one rank (no all-reduce, cp 1)."""
    keys = losses_reduced[0]["keys"]
    values = None
    for item in losses_reduced:
        values = item["values"] if values is None else values + item["values"]
    assert len(keys) + 1 == values.numel()
    values = values.tolist()
    divisor = values[0] if per_token else step_global_batch_size
    return {key: value / divisor for key, value in zip(keys, values[1:], strict=False)}


# ----------------------------------------------------------------------------------- helpers


def make_mb(lens, rollout_ids, seed=0, masked=((0, 1),)) -> dict:
    """A slime micro-batch: per-sample 1-D tensors of different lengths (float32 log-probs,
    int masks with a few tool tokens at `masked` (sample, position)), packed pg_loss."""
    rng = np.random.default_rng(seed)
    lt = [torch.tensor(np.log(rng.uniform(0.02, 1, n)), dtype=torch.float32) for n in lens]
    li = [
        (t + torch.tensor(rng.normal(0, 0.1, t.numel()), dtype=torch.float32)).clamp(max=0)
        for t in lt
    ]
    masks = [torch.ones(n, dtype=torch.int) for n in lens]
    for i, j in masked:
        masks[i][j] = 0
    sums: dict[int, int] = {}
    for rid, m in zip(rollout_ids, masks, strict=True):
        sums[rid] = sums.get(rid, 0) + int(m.sum())
    return {
        "log_probs": lt,
        "rollout_log_probs": li,
        "loss_masks": masks,
        "response_lengths": list(lens),
        "total_lengths": [n + 4 for n in lens],
        "rollout_mask_sums": torch.tensor([float(sums[r]) for r in rollout_ids]),
        "pg_loss": torch.tensor(rng.normal(0, 1, sum(lens)), dtype=torch.float32),
    }


def direct(mb: dict, monitor: StepMonitor | None = None) -> dict[str, float]:
    """A StepMonitor fed the micro-batch's tokens directly (packed, seq_lens)."""
    mon = monitor or StepMonitor()
    cat = lambda ts: torch.cat(ts).double().numpy()  # noqa: E731
    return mon.update(
        cat(mb["rollout_log_probs"]), cat(mb["log_probs"]), cat(mb["loss_masks"]),
        seq_lens=mb["response_lengths"],
    )  # fmt: skip


def same(a: float, b: float, rel: float = 1e-6) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.fixture
def plugin():
    S.reset()
    yield S.monitor_tis
    S.reset()


ARGS = Namespace()  # slime's args: the plug-in reads only mismatch_* attributes

# ------------------------------------------------------------------------------------ tests


def test_logged_metrics_equal_a_monitor_fed_the_same_tokens(plugin) -> None:
    """One micro-batch of four samples (lengths 5, 9, 3, 7; a tool token masked), each its
    own rollout: after slime's reduction every logged value equals the monitor's number
    (float32), the loss and the masks come back untouched."""
    mb = make_mb([5, 9, 3, 7], [0, 1, 2, 3])
    pg0 = mb["pg_loss"].clone()
    pg, masks, log = slime_micro_batch(plugin, ARGS, mb)
    got = reduce_train_step_metrics([log], False, step_global_batch_size=4)
    want = direct(mb)
    assert pg is mb["pg_loss"] and torch.equal(pg, pg0)
    assert all(torch.equal(a, b) for a, b in zip(masks, mb["loss_masks"], strict=True))
    assert got.keys() <= want.keys() and len(got) > 20
    for k, v in got.items():
        assert same(v, want[k]), (k, v, want[k])
    assert not any(k.startswith(("mismatch/bucket/", "mismatch/corrections/")) for k in got)


def test_all_keys_on_request_and_rollouts_split_over_micro_batches(monkeypatch, plugin) -> None:
    """mismatch_log=all gives every monitor key. Two rollouts of two samples each, one split
    over the two micro-batches: slime logs the micro-batches' values weighted by their share
    of each rollout's tokens, over the rollout count; per-token loss: by token count."""
    monkeypatch.setenv("MISMATCH_LOG", "all")
    mb1 = make_mb([6, 4, 5], [0, 0, 1], seed=1)
    mb2 = make_mb([8], [1], seed=2, masked=())
    # rollout 1's denominator spans both micro-batches (5 tokens here, 8 there)
    denom1 = float(int(mb1["loss_masks"][2].sum()) + 8)
    mb1["rollout_mask_sums"][2] = denom1
    mb2["rollout_mask_sums"][0] = denom1
    logs = [slime_micro_batch(plugin, ARGS, mb)[2] for mb in (mb1, mb2)]
    got = reduce_train_step_metrics(logs, False, step_global_batch_size=2)
    mon = StepMonitor()
    v1, v2 = direct(mb1, mon), direct(mb2, mon)
    w1 = 1.0 + 5 / denom1  # rollout 0 whole, 5 of rollout 1's tokens
    w2 = 8 / denom1
    assert set(got) == set(v1)
    for k in ("mismatch/k3", "mismatch/mean_abs_delta", "mismatch/bucket/0.5_0.9/mean_abs_delta"):
        assert same(got[k], (w1 * v1[k] + w2 * v2[k]) / 2), k
    S.reset()
    logs = [slime_micro_batch(S.monitor_tis, ARGS, mb, per_token=True)[2] for mb in (mb1, mb2)]
    got = reduce_train_step_metrics(logs, True, step_global_batch_size=2)
    n1, n2 = v1["mismatch/num_tokens"], v2["mismatch/num_tokens"]
    assert same(got["mismatch/k3"], (n1 * v1["mismatch/k3"] + n2 * v2["mismatch/k3"]) / (n1 + n2))


def test_correction_tis_token_and_icepop_reuse_the_rules(plugin) -> None:
    """mismatch_correction=tis-token: pg_loss times min(r, C) per loss token (C=2 shipped,
    C=3 with mismatch_set), masks unchanged; icepop: weight r inside [0.5, 5], tokens
    outside dropped from the masks. The weights are the rule functions' own."""
    mb = make_mb([5, 9, 3, 7], [0, 1, 2, 3], seed=3)
    big = mb["rollout_log_probs"][1]
    big[2], big[4] = big[2] - 2.0, big[4] + 1.2  # r ~ e^2 (clipped, masked), e^-1.2 (masked)
    mask = torch.cat(mb["loss_masks"]).bool().numpy()
    delta = (torch.cat(mb["rollout_log_probs"]) - torch.cat(mb["log_probs"])).double().numpy()[mask]
    seq = np.repeat(np.arange(4), mb["response_lengths"])[mask]
    for args, C in ((Namespace(mismatch_correction="tis-token"), 2.0),
                    (Namespace(mismatch_correction="tis-token", mismatch_set="tis-token.C=3"), 3.0)):  # fmt: skip
        S.reset()
        pg, masks, log = slime_micro_batch(S.monitor_tis, args, mb)
        w = np.ones(mask.size)
        w[mask] = rule_tis_token(delta, seq, C).weight
        assert torch.allclose(pg, mb["pg_loss"] * torch.tensor(w, dtype=torch.float32))
        assert all(torch.equal(a, b) for a, b in zip(masks, mb["loss_masks"], strict=True))
        got = reduce_train_step_metrics([log], False, 4)
        assert got["mismatch/correction_applied"] == 1.0
        assert "mismatch/corrections/tis-token/tokens_clipped" in got
    S.reset()
    pg, masks, _ = slime_micro_batch(S.monitor_tis, Namespace(mismatch_correction="icepop"), mb)
    ap = rule_icepop(delta, seq, 0.5, 5.0)
    assert ap.masked.sum() == 2
    w = np.ones(mask.size)
    w[mask] = ap.weight
    assert torch.allclose(pg, mb["pg_loss"] * torch.tensor(w, dtype=torch.float32))
    keep = np.ones(mask.size, bool)
    keep[np.flatnonzero(mask)[ap.masked]] = False
    assert torch.equal(torch.cat(masks), torch.cat(mb["loss_masks"]) * torch.tensor(keep).int())


def test_a_recomputed_loss_is_not_fed_twice(plugin) -> None:
    """--recompute-loss-function reruns the loss (and this function) in the backward pass:
    the same micro-batch again returns the same metrics and the monitor counts it once."""
    mb = make_mb([5, 9], [0, 1])
    a = slime_micro_batch(plugin, ARGS, mb)[2]
    b = slime_micro_batch(plugin, ARGS, mb)[2]
    assert torch.equal(a["values"], b["values"])
    assert S.get_monitor().monitor.num_steps == 1
    slime_micro_batch(plugin, ARGS, make_mb([5, 9], [0, 1], seed=5))
    assert S.get_monitor().monitor.num_steps == 2


def _bad_inputs() -> list[tuple[str, dict]]:
    shapes = make_mb([5, 9], [0, 1])
    shapes["log_probs"][1] = shapes["log_probs"][1][:-2]  # 7 train log-probs, 9 rollout ones
    empty = make_mb([5, 9], [0, 1])
    empty["loss_masks"] = [torch.zeros_like(m) for m in empty["loss_masks"]]
    nan = make_mb([5, 9], [0, 1])
    nan["log_probs"][0][2] = float("nan")
    above = make_mb([5, 9], [0, 1])
    above["rollout_log_probs"][1][3] = 0.05
    return [("shapes", shapes), ("empty", empty), ("nan", nan), ("above0", above)]


@pytest.mark.parametrize("kind", ["shapes", "empty", "nan", "above0"])
def test_bad_input_warns_once_and_leaves_the_step_alone(kind: str, plugin) -> None:
    """Mismatched shapes, a mask with no token, a NaN log-prob, a log-prob above 0: slime's
    step goes on (no exception), one MonitorWarning however often it recurs, the same keys
    as a good micro-batch (slime stacks and all-reduces them), the loss and masks unchanged
    even with a correction configured; NaN metrics, or the documented counts."""
    mb = dict(_bad_inputs())[kind]
    args = Namespace(mismatch_correction="tis-token")
    good_keys = slime_micro_batch(plugin, args, make_mb([4, 6], [0, 1], seed=9))[2]["keys"]
    with pytest.warns(MonitorWarning) as rec:
        pg, masks, log = slime_micro_batch(plugin, args, mb)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MonitorWarning)  # a second bad step: no new warning
            bad2 = dict(mb, pg_loss=mb["pg_loss"] + 1)
            slime_micro_batch(plugin, args, bad2)
    assert len(rec) == 1
    assert log["keys"] == good_keys
    assert torch.equal(pg, mb["pg_loss"])
    assert all(torch.equal(a, b) for a, b in zip(masks, mb["loss_masks"], strict=True))
    got = reduce_train_step_metrics([log], False, 2)
    if kind == "shapes":
        assert math.isnan(got["mismatch/k3"])
    elif kind == "empty":  # NaN on no loss token: no weight in slime's reduction, as its own
        assert got["mismatch/k3"] == 0.0 and got["mismatch/num_tokens"] == 0.0
    else:
        key = "mismatch/num_infinite" if kind == "nan" else "mismatch/num_logp_above_0"
        assert got[key] > 0 and math.isfinite(got["mismatch/k3"])
        assert got["mismatch/correction_applied"] == 0.0


def test_settings_from_args_then_environment(monkeypatch) -> None:
    monkeypatch.setenv("MISMATCH_CORRECTION", "icepop")
    monkeypatch.setenv("MISMATCH_EPS", "0.3")
    c = S.SlimeConfig.from_args(Namespace(mismatch_set="icepop.hi=4"))
    assert c.correction == "icepop" and c.params == {"lo": 0.5, "hi": 4.0} and c.eps == 0.3
    assert S.SlimeConfig.from_args(Namespace(mismatch_correction="none")).correction is None
    with pytest.raises(ValueError, match="choose one of"):
        S.SlimeConfig.from_args(Namespace(mismatch_correction="dvp-minp"))
    with pytest.raises(ValueError, match="choose core or all"):
        S.SlimeConfig(log="some")
