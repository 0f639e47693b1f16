"""The driver's L2T step (records, raw penalties, outcomes -> rewards, advantages, metrics) and the
per-sample record it reads, on hand-made batches."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from l2t_verl.advantage import l2t_advantage
from l2t_verl.record import RecordError, SampleRecord, outcome_extra_info, read_records
from l2t_verl.settings import L2TConfig
from l2t_verl.step import JrHealth, l2t_step

K_MAX = 4
LENGTHS = [8, 6, 7, 5, 0, 6]
INDEX = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
OUTCOMES = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])


def records() -> list[SampleRecord]:
    return [
        SampleRecord(
            (2, 5, 7),
            (0.1, 0.3, 0.2, 0.9),
            (0.2, -0.1, 0.7),
            probe_tokens=12,
            probe_time_s=0.5,
            probe_cache_fallbacks=2,
        ),
        SampleRecord((3, 6), (0.1, 0.2, 0.15), (0.1, -0.05)),
        # probes failed: the episodes exist, but get no process reward and no penalty
        SampleRecord((4,), probe_failed=True, probe_error="TimeoutError: ..."),
        SampleRecord((1, 4), (0.0, 0.4, 0.3), (0.4, -0.1), probe_verifier_errors=1),
        SampleRecord(),  # empty response: K = 0
        SampleRecord((3,), (0.2, 0.8), (0.6,), outcome=1.0, outcome_verifier_error=True),
    ]


def config(**overrides) -> L2TConfig:
    node = {"alpha": 0.8, "beta": 0.6, "episodes": {"max_episodes": K_MAX}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            node.setdefault(section, {})[name] = value
        else:
            node[key] = value
    return L2TConfig.from_config(node)


def response_mask() -> torch.Tensor:
    return (torch.arange(8)[None, :] < torch.tensor(LENGTHS)[:, None]).float()


RAW = torch.tensor(
    [
        [1.0, 2.0, 3.0, 0.0],
        [4.0, 5.0, 0.0, 0.0],
        [100.0, 0.0, 0.0, 0.0],  # belongs to the failed response: must not count anywhere
        [2.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [6.0, 0.0, 0.0, 0.0],
    ]
)


def test_step_rewards_advantages_and_metrics():
    cfg = config()
    result = l2t_step(records(), OUTCOMES, response_mask(), INDEX, cfg, raw_penalties=RAW)

    rewarded = torch.zeros(6, K_MAX, dtype=torch.bool)
    for i, n in ((0, 3), (1, 2), (3, 2), (5, 1)):
        rewarded[i, :n] = True
    assert torch.equal(result.episode_mask, rewarded)

    # p_hat = p * mean|dJ| / mean p over the 8 rewarded episodes (the failed response's 100 excluded)
    dj = torch.tensor([0.2, -0.1, 0.7, 0.1, -0.05, 0.4, -0.1, 0.6])
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 2.0, 1.0, 6.0])
    p_hat = raw * dj.abs().mean() / raw.mean()
    torch.testing.assert_close(result.penalty_hat[rewarded], p_hat)
    torch.testing.assert_close(result.process_rewards[rewarded], dj - 0.6 * p_hat)
    assert torch.equal(result.process_rewards[~rewarded], torch.zeros(int((~rewarded).sum())))

    # The advantage is exactly l2t_advantage on those rewards.
    expected, _ = l2t_advantage(
        OUTCOMES, result.process_rewards, rewarded, result.episode_ends, response_mask(), INDEX, alpha=0.8
    )
    torch.testing.assert_close(result.advantages, expected)

    m = result.metrics
    assert m["l2t/penalty_mean"] == pytest.approx(m["l2t/delta_jr_abs_mean"], rel=1e-6)
    assert m["l2t/delta_jr_abs_mean"] == pytest.approx(float(dj.abs().mean()))
    assert m["l2t/penalty_raw_mean"] == pytest.approx(float(raw.mean()))
    assert m["l2t/penalty_clipped"] == 0 and m["l2t/penalty_nonfinite"] == 0
    assert m["l2t/rewarded_episodes"] == 8
    assert (
        m["l2t/episodes_per_response/mean"] == pytest.approx(9 / 6)
        and m["l2t/episodes_per_response/max"] == 3
    )
    assert m["l2t/jr_last_correct"] == pytest.approx((0.9 + 0.8) / 2)  # responses 0 and 5
    assert m["l2t/jr_last_wrong"] == pytest.approx((0.15 + 0.3) / 2)  # responses 1 and 3
    assert m["l2t/jr_first"] == pytest.approx((0.1 + 0.1 + 0.0 + 0.2) / 4)
    assert m["l2t/probe_failures"] == 1 and m["l2t/verifier_errors"] == 2
    assert m["l2t/responses"] == 6  # the denominator of probe_failures in l2t_verl.summary
    assert m["l2t/probe_cache_fallbacks"] == 2
    assert m["l2t/outcome_acc"] == pytest.approx(0.5)
    valid = response_mask().bool()
    assert m["l2t/adv_outcome_std"] > 0 and m["l2t/adv_process_std"] > 0
    assert m["l2t/adv_outcome_std"] + m["l2t/adv_process_std"] >= float(result.advantages[valid].std()) - 1e-6


def test_alpha_zero_is_grpo_and_penalty_outliers_are_clipped():
    cfg = config(alpha=0.0)
    outcome_only = l2t_step(records(), OUTCOMES, response_mask(), INDEX, cfg, raw_penalties=RAW)
    assert outcome_only.metrics["l2t/adv_process_std"] == 0.0

    raw = RAW.clone()
    raw[0, 0] = 1e4  # one outlier episode; with 8 rewarded episodes p_hat <= 8 x the mean, so clip at 3
    result = l2t_step(
        records(), OUTCOMES, response_mask(), INDEX, config(penalty__clip=3.0), raw_penalties=raw
    )
    assert result.metrics["l2t/penalty_clipped"] == 1
    assert float(result.penalty_hat[0, 0]) == pytest.approx(3 * result.metrics["l2t/delta_jr_abs_mean"])


def test_non_finite_penalties_are_zero_and_counted():
    raw = RAW.clone()
    raw[1, 1] = math.nan
    raw[2, 0] = math.inf  # a failed response's episode: not rewarded, so not a fault
    result = l2t_step(records(), OUTCOMES, response_mask(), INDEX, config(), raw_penalties=raw)
    assert result.metrics["l2t/penalty_nonfinite"] == 1
    assert result.penalty_hat[1, 1] == 0 and result.penalty_raw[1, 1] == 0
    assert torch.isfinite(result.advantages).all()


def test_ablations():
    # No progress term: r_k = -beta * p_hat, p_hat on the batch-mean scale (nothing to scale to).
    no_progress = l2t_step(records(), OUTCOMES, response_mask(), INDEX, config(progress__enable=False), RAW)
    rewarded = no_progress.episode_mask
    assert bool(rewarded[2, 0])  # without probes nothing failed: every episode is rewarded
    assert float(no_progress.penalty_hat[rewarded].mean()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(no_progress.process_rewards, -0.6 * no_progress.penalty_hat)
    # No penalty: r_k = delta_J, and the raw penalties are not even read.
    no_penalty = l2t_step(records(), OUTCOMES, response_mask(), INDEX, config(beta=0.0), raw_penalties=None)
    torch.testing.assert_close(no_penalty.process_rewards, no_penalty.delta_j)
    assert no_penalty.metrics["l2t/penalty_mean"] == 0.0


def test_record_round_trip_and_outcome():
    record = SampleRecord(
        (2, 5), (0.1, 0.3, 0.2), (0.2, -0.1), probe_tokens=7, probe_time_s=0.25, probe_cache_fallbacks=1
    )
    extra = record.to_extra_fields()
    assert all(key.startswith("l2t_") for key in extra)
    extra["reward_extra_info"] = outcome_extra_info(1.0, verifier_error=False)
    back = SampleRecord.from_extra_fields(extra)
    assert back == SampleRecord(
        (2, 5),
        (0.1, 0.3, 0.2),
        (0.2, -0.1),
        probe_tokens=7,
        probe_time_s=0.25,
        probe_cache_fallbacks=1,
        outcome=1.0,
    )
    # numpy arrays, as values come back from TransferQueue
    arrays = {k: np.array(v) if isinstance(v, list) else v for k, v in record.to_extra_fields().items()}
    assert SampleRecord.from_extra_fields(arrays).episode_ends == (2, 5)
    assert SampleRecord.from_extra_fields(None) == SampleRecord() == SampleRecord.from_extra_fields({"x": 1})


@pytest.mark.parametrize(
    ("extra", "length", "match"),
    [
        ({"l2t_episode_ends": [2, 9], "l2t_jr": [0, 0, 0], "l2t_delta_j": [0, 0]}, 5, "episode_ends"),
        ({"l2t_episode_ends": [3, 3], "l2t_jr": [0, 0, 0], "l2t_delta_j": [0, 0]}, 5, "episode_ends"),
        ({"l2t_episode_ends": [1, 2], "l2t_jr": [0, 0], "l2t_delta_j": [0.1]}, 5, "delta_j"),
        ({"l2t_episode_ends": [1], "l2t_jr": [0.0, math.nan], "l2t_delta_j": [math.nan]}, 5, "non-finite"),
        ({"l2t_episode_ends": ["x"]}, 5, "malformed"),
        ({"l2t_episode_ends": "12"}, 5, "malformed"),
    ],
)
def test_bad_records_are_errors_naming_the_field(extra, length, match):
    with pytest.raises(RecordError, match=match):
        SampleRecord.from_extra_fields(extra).check(length, progress=True)


def test_read_records_counts_and_logs_unusable_ones(caplog):
    good = SampleRecord((2,), (0.1, 0.5), (0.4,)).to_extra_fields()
    bad = {**good, "l2t_episode_ends": [9], "reward_extra_info": outcome_extra_info(1.0, False)}
    too_many = SampleRecord((1, 2, 3), (0, 0, 0, 0), (0, 0, 0)).to_extra_fields()
    with caplog.at_level(logging.WARNING, logger="l2t_verl.record"):
        got, malformed = read_records([good, bad, too_many, {}], [4, 4, 4, 4], progress=True, max_episodes=2)
    assert malformed == 2 and len(caplog.records) == 2 and "sample 1" in caplog.records[0].getMessage()
    assert got[0].episode_ends == (2,) and got[3] == SampleRecord()
    assert got[1].probe_failed and got[1].num_episodes == 0 and got[1].outcome == 1.0
    assert "max_episodes" in got[2].probe_error
    # A failed probe's record is usable as it is (outcome only is decided by the step, not here).
    failed = SampleRecord((2,), probe_failed=True).to_extra_fields()
    assert read_records([failed], [4], progress=True) == ([SampleRecord((2,), probe_failed=True)], 0)


def test_jr_health_warns_after_five_bad_steps(caplog):
    health = JrHealth()
    bad = {"l2t/jr_last_correct": 0.2, "l2t/jr_last_wrong": 0.3}
    with caplog.at_level(logging.WARNING, logger="l2t_verl.step"):
        assert [health.update(bad) for _ in range(4)] == [False] * 4
        assert not health.update({"l2t/jr_last_correct": 0.9})  # one class only: not counted either way
        assert health.update(bad)
    assert "HEALTH CHECK FAILED" in caplog.text
    assert not health.update({"l2t/jr_last_correct": 0.9, "l2t/jr_last_wrong": 0.1})  # recovered: reset
    assert health.bad_steps == 0
