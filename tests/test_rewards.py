"""Rewards (L2T_SPEC.md sections 3-4 and 8)."""

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


def test_normalize_penalties_batch_mean():
    raw = torch.tensor([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    p_hat, n_bad = normalize_penalties(raw, mask, "batch_mean")
    mean = (1.0 + 3.0 + 2.0) / 3
    expected = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]]) / (mean + 1e-8)
    assert n_bad == 0
    torch.testing.assert_close(p_hat, expected)
    assert float(p_hat[mask].mean()) == pytest.approx(1.0)


def test_normalize_penalties_none_and_nonfinite():
    raw = torch.tensor([[1.0, math.nan, 4.0], [math.inf, 2.0, -math.inf]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    p, n_bad = normalize_penalties(raw, mask, "none")
    assert n_bad == 2  # the masked-out -inf is padding, not a fault
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 4.0], [0.0, 2.0, 0.0]]))
    p_hat, n_bad = normalize_penalties(raw, mask, "batch_mean")
    assert n_bad == 2 and torch.isfinite(p_hat).all()
    torch.testing.assert_close(p_hat, p / ((1.0 + 4.0 + 2.0) / 5 + 1e-8))


def test_normalize_penalties_degenerate():
    zeros, n_bad = normalize_penalties(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), "batch_mean")
    assert n_bad == 0 and torch.equal(zeros, torch.zeros(2, 3))  # step 1: no update, no penalty
    empty, _ = normalize_penalties(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), "batch_mean")
    assert torch.equal(empty, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="l2t.penalty.normalize"):
        normalize_penalties(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), "max")
    with pytest.raises(ValueError, match="mask"):
        normalize_penalties(torch.ones(1, 2), torch.ones(1, 1, dtype=torch.bool))


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
