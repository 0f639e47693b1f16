"""Rewards (docs/method.md §§3-4 and 8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2t_verl.rewards import dense_token_rewards, normalize_penalties, process_rewards


def test_process_rewards():
    assert process_rewards([0.5, -0.25], [1.0, 2.0], beta=0.6) == pytest.approx([0.5 - 0.6, -0.25 - 1.2])
    assert process_rewards([], [], beta=0.6) == []
    assert process_rewards([0.3], [5.0], beta=0.0) == [0.3]  # penalty off
    with pytest.raises(ValueError, match="penalties_hat"):
        process_rewards([0.1, 0.2], [1.0], beta=0.6)


MASK = torch.tensor([[True, True, False], [True, False, False]])
DELTA_J = torch.tensor([[0.2, -0.1, 9.0], [0.05, 7.0, 0.0]])  # 9.0 and 7.0 are not rewarded


def test_delta_j_scale_puts_beta_p_hat_on_the_size_of_progress():
    raw = torch.tensor([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]])
    scale = normalize_penalties(raw, MASK, "delta_j", delta_j=DELTA_J)
    mean_abs_dj = (0.2 + 0.1 + 0.05) / 3
    expected = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]]) * mean_abs_dj / 2.0
    torch.testing.assert_close(scale.p_hat, expected)
    assert float(scale.p_hat[MASK].mean()) == pytest.approx(mean_abs_dj)
    assert (scale.mode, scale.n_clipped, scale.n_nonfinite) == ("delta_j", 0, 0)


@pytest.mark.parametrize("magnitude", [1e-12, 1e-10, 1e-6, 1e-3, 1.0, 1e2])
def test_scaling_does_not_depend_on_the_raw_size(magnitude):
    """No absolute epsilon: at lr 1e-6 raw penalties are ~1e-10 and must scale like any others."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 5, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.rand(6, 5, generator=gen) > 0.3
    dj = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.1
    reference = normalize_penalties(raw, mask, "delta_j", delta_j=dj).p_hat
    scaled = normalize_penalties(raw.float() * magnitude, mask, "delta_j", delta_j=dj.float()).p_hat
    torch.testing.assert_close(scaled.double(), reference, rtol=1e-5, atol=0)
    assert float(scaled[mask].double().mean()) == pytest.approx(float(dj[mask].abs().mean()), rel=1e-5)
    batch_mean = normalize_penalties(raw.float() * magnitude, mask, "batch_mean").p_hat
    assert float(batch_mean[mask].double().mean()) == pytest.approx(1.0, rel=1e-5)


def test_clip_at_clip_times_mean_abs_delta_j_is_counted():
    raw = torch.tensor([[1.0, 1.0, 1.0, 1.0, 96.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    dj = torch.full((1, 5), 0.1)
    scale = normalize_penalties(raw, mask, "delta_j", delta_j=dj, clip=3.0)
    # mean p = 20: p_hat = p * 0.1 / 20 -> 0.005 each and 0.48 for the outlier, clipped at 3 * 0.1
    torch.testing.assert_close(scale.p_hat, torch.tensor([[0.005, 0.005, 0.005, 0.005, 0.3]]))
    assert scale.n_clipped == 1
    # batch_mean clips at `clip` itself (its mean is 1)
    scale = normalize_penalties(raw, mask, "batch_mean", clip=3.0)
    torch.testing.assert_close(scale.p_hat, torch.tensor([[0.05, 0.05, 0.05, 0.05, 3.0]]))
    assert scale.n_clipped == 1


def test_without_progress_delta_j_falls_back_to_batch_mean():
    raw = torch.tensor([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]])
    scale = normalize_penalties(raw, MASK, "delta_j", delta_j=None)
    assert scale.mode == "batch_mean"
    torch.testing.assert_close(scale.p_hat, torch.tensor([[0.5, 1.5, 0.0], [1.0, 0.0, 0.0]]))


def test_normalize_penalties_none_and_nonfinite():
    raw = torch.tensor([[1.0, math.nan, 4.0], [math.inf, 2.0, -math.inf]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scale = normalize_penalties(raw, mask, "none")
    assert scale.n_nonfinite == 2  # the masked-out -inf is padding, not a fault
    assert torch.equal(scale.p_hat, torch.tensor([[1.0, 0.0, 4.0], [0.0, 2.0, 0.0]]))
    scale = normalize_penalties(raw, mask, "batch_mean")
    assert scale.n_nonfinite == 2 and torch.isfinite(scale.p_hat).all()
    torch.testing.assert_close(scale.p_hat, torch.tensor([[1.0, 0.0, 4.0], [0.0, 2.0, 0.0]]) / (7.0 / 5))


def test_normalize_penalties_degenerate():
    ones = torch.ones(2, 3, dtype=torch.bool)
    for mode in ("delta_j", "batch_mean"):
        zeros = normalize_penalties(torch.zeros(2, 3), ones, mode, delta_j=torch.ones(2, 3))
        assert torch.equal(zeros.p_hat, torch.zeros(2, 3))  # step 1: no update, no penalty
    empty = normalize_penalties(
        torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), "delta_j", torch.ones(2, 3)
    )
    assert torch.equal(empty.p_hat, torch.zeros(2, 3))
    no_progress = normalize_penalties(torch.ones(2, 3), ones, "delta_j", delta_j=torch.zeros(2, 3))
    assert torch.equal(no_progress.p_hat, torch.zeros(2, 3))  # mean |dJ| = 0: nothing to scale to
    with pytest.raises(ValueError, match="l2t.penalty.normalize"):
        normalize_penalties(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), "max")
    with pytest.raises(ValueError, match="mask"):
        normalize_penalties(torch.ones(1, 2), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="clip"):
        normalize_penalties(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), clip=0.0)


def test_dense_token_rewards_placement():
    r = dense_token_rewards(6, [2, 4], outcome=1.0, process=[0.5, -0.25], alpha=0.8)
    expected = torch.tensor([0.0, 0.4, 0.0, -0.2, 0.0, 1.0])
    torch.testing.assert_close(r, expected)
    # The last episode ending on the last token: both rewards add up there.
    r = dense_token_rewards(4, [1, 4], outcome=1.0, process=[0.5, 0.25], alpha=0.8)
    torch.testing.assert_close(r, torch.tensor([0.4, 0.0, 0.0, 1.2]))
    # K = 0: outcome only. Empty response: nothing to carry a reward.
    torch.testing.assert_close(dense_token_rewards(3, [], 1.0, [], 0.8), torch.tensor([0.0, 0.0, 1.0]))
    assert dense_token_rewards(0, [], 1.0, [], 0.8).shape == (0,)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3, [1, 2], 1.0, [0.1], 0.8), "process"),
        ((3, [2, 2], 1.0, [0.1, 0.2], 0.8), "episode_ends"),
        ((3, [4], 1.0, [0.1], 0.8), "episode_ends"),
        ((3, [0], 1.0, [0.1], 0.8), "episode_ends"),
        ((3, [1], math.nan, [0.1], 0.8), "finite"),
        ((-1, [], 1.0, [], 0.8), "response_len"),
    ],
)
def test_dense_token_rewards_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        dense_token_rewards(*args)


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    length=st.integers(1, 30),
    outcome=st.sampled_from([0.0, 1.0]),
    alpha=st.floats(0.0, 2.0),
)
def test_dense_token_rewards_sum_is_eq5(data, length, outcome, alpha):
    ends = sorted(data.draw(st.sets(st.integers(1, length), max_size=length)))
    process = data.draw(st.lists(st.floats(-1, 1), min_size=len(ends), max_size=len(ends)))
    r = dense_token_rewards(length, ends, outcome, process, alpha, dtype=torch.float64)
    assert float(r.sum()) == pytest.approx(outcome + alpha * sum(process), abs=1e-9)
    nonzero = {i for i in range(length) if r[i] != 0}
    assert nonzero <= {e - 1 for e in ends} | {length - 1}
