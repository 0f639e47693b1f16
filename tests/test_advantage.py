"""The L2T advantage, process-supervised GRPO (docs/method.md §5), on hand-made batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from l2t_verl.advantage import l2t_advantage, normalized_process_rewards

# Two prompt groups. Response lengths, episode ends (exclusive) and which episodes are rewarded.
LENGTHS = [9, 6, 7, 0, 8, 5]
ENDS = [[2, 5, 7], [3, 6], [4], [], [1, 3, 6], [2, 4]]
INDEX = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
OUTCOMES = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
K, T = 3, 10


def make_batch(seed: int = 0, failed: tuple[int, ...] = ()):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(LENGTHS), K, dtype=torch.bool)
    ends = torch.zeros(len(LENGTHS), K, dtype=torch.long)
    for i, e in enumerate(ENDS):
        ends[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = i not in failed
    rewards = torch.randn(len(LENGTHS), K, generator=gen)
    response_mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    return rewards, mask, ends, response_mask


def call(rewards, mask, ends, response_mask, alpha=0.8, norm=True, outcomes=OUTCOMES, index=INDEX):
    adv, returns = l2t_advantage(
        outcome_scores=outcomes,
        process_rewards=rewards,
        episode_mask=mask,
        episode_ends=ends,
        response_mask=response_mask,
        index=index,
        alpha=alpha,
        norm_adv_by_std_in_grpo=norm,
    )
    assert torch.equal(adv, returns)
    return adv


def grpo(response_mask, norm=True, outcomes=OUTCOMES, index=INDEX):
    """verl's GRPO with the outcome on the last valid token, as verl's own trainer runs it."""
    rewards = torch.zeros_like(response_mask)
    for i, n in enumerate(response_mask.sum(-1).long().tolist()):
        if n:
            rewards[i, n - 1] = outcomes[i]
    adv, _ = compute_grpo_outcome_advantage(rewards, response_mask, index, norm_adv_by_std_in_grpo=norm)
    return adv


def brute_force(rewards, mask, ends, response_mask, alpha, norm, eps=1e-6):
    """Section 5 written out with loops over groups, responses, episodes and tokens."""
    adv = torch.zeros_like(response_mask, dtype=torch.float64)
    for uid in set(INDEX.tolist()):
        rows = [i for i in range(len(INDEX)) if INDEX[i] == uid]
        scores = [float(OUTCOMES[i]) for i in rows]
        mean_o = sum(scores) / len(scores)
        std_o = math.sqrt(sum((s - mean_o) ** 2 for s in scores) / (len(scores) - 1))
        episodes = [(i, k) for i in rows for k in range(K) if mask[i, k]]
        values = [float(rewards[i, k]) for i, k in episodes]
        tilde = {}
        if len(values) >= 2 and max(values) != min(values):
            mean_p = sum(values) / len(values)
            std_p = math.sqrt(sum((v - mean_p) ** 2 for v in values) / (len(values) - 1))
            tilde = {
                ik: (v - mean_p) / (std_p + eps if norm else 1.0)
                for ik, v in zip(episodes, values, strict=False)
            }
        for i in rows:
            a_out = (float(OUTCOMES[i]) - mean_o) / (std_o + eps if norm else 1.0)
            for t in range(int(response_mask[i].sum())):
                to_go = sum(tilde.get((i, k), 0.0) for k in range(K) if mask[i, k] and int(ends[i, k]) > t)
                adv[i, t] = a_out + alpha * to_go
    return adv.float()


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed, norm):
    rewards, mask, ends, response_mask = make_batch(seed, failed=(2,))
    expected = brute_force(rewards, mask, ends, response_mask, 0.8, norm)
    torch.testing.assert_close(
        call(rewards, mask, ends, response_mask, norm=norm), expected, rtol=1e-5, atol=1e-6
    )


def test_hand_computed_example():
    # One group of two responses; episodes end at 2 and 4 in response 0, at 1 in response 1.
    rewards = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    ends = torch.tensor([[2, 4], [1, 0]])
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    adv = call(
        rewards, mask, ends, response_mask, alpha=0.8, outcomes=torch.tensor([1.0, 0.0]), index=["g", "g"]
    )
    # r = [0.5, -0.25, 1.0]: mean 0.41667, unbiased std 0.62915
    mean, std = (
        0.5 / 1.2,
        math.sqrt(((0.5 - 0.5 / 1.2) ** 2 + (-0.25 - 0.5 / 1.2) ** 2 + (1 - 0.5 / 1.2) ** 2) / 2),
    )
    t0, t1, t2 = ((v - mean) / (std + 1e-6) for v in (0.5, -0.25, 1.0))
    a_out = 0.5 / (math.sqrt(0.5) + 1e-6)  # outcomes 1, 0: mean 0.5, unbiased std sqrt(0.5)
    expected = torch.tensor(
        [
            [a_out + 0.8 * (t0 + t1)] * 2 + [a_out + 0.8 * t1] * 2 + [a_out],
            [-a_out + 0.8 * t2, -a_out, -a_out, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize("norm", [True, False])
def test_equal_rewards_in_a_group_is_verls_grpo_exactly(norm):
    rewards, mask, ends, response_mask = make_batch()
    rewards = torch.where(torch.tensor(INDEX == "a")[:, None], 0.37, -1.2).expand(-1, K).clone()
    assert torch.equal(call(rewards, mask, ends, response_mask, norm=norm), grpo(response_mask, norm))
    # No rewarded episode at all is GRPO too.
    none = torch.zeros_like(mask)
    assert torch.equal(call(rewards, none, ends, response_mask, norm=norm), grpo(response_mask, norm))


def test_linear_in_alpha():
    rewards, mask, ends, response_mask = make_batch(3)
    base = call(rewards, mask, ends, response_mask, alpha=0.0)
    unit = call(rewards, mask, ends, response_mask, alpha=1.0) - base
    assert unit.abs().max() > 0.5
    for alpha in (0.08, 0.8, 2.5):
        torch.testing.assert_close(call(rewards, mask, ends, response_mask, alpha=alpha), base + alpha * unit)
    # Batch whitening made alpha = 0.8 and 0.08 identical; here the process parts differ 10-fold.
    assert not torch.allclose(
        call(rewards, mask, ends, response_mask, alpha=0.8),
        call(rewards, mask, ends, response_mask, alpha=0.08),
    )


def test_invariant_to_a_per_group_shift():
    rewards, mask, ends, response_mask = make_batch(4)
    shift = torch.where(torch.tensor(INDEX == "a")[:, None], 3.0, -0.7)
    torch.testing.assert_close(
        call(rewards + shift, mask, ends, response_mask),
        call(rewards, mask, ends, response_mask),
        rtol=1e-5,
        atol=1e-5,
    )


def test_tail_empty_and_failed_responses_get_the_outcome_part_only():
    rewards, mask, ends, response_mask = make_batch(5, failed=(1,))
    adv = call(rewards, mask, ends, response_mask)
    outcome = grpo(response_mask)
    for i, _e in enumerate(ENDS):
        last_end = int(ends[i][mask[i]].max()) if bool(mask[i].any()) else 0
        tail = slice(last_end, LENGTHS[i])
        assert torch.equal(adv[i, tail], outcome[i, tail]), i  # exactly, not approximately
    assert torch.equal(adv[1], outcome[1])  # probes failed: outcome only everywhere
    assert torch.equal(adv[3], torch.zeros(T))  # empty response
    assert torch.equal(adv[response_mask == 0], torch.zeros(int((response_mask == 0).sum())))  # padding


def test_later_rewards_reach_earlier_tokens_never_the_reverse():
    rewards, mask, ends, response_mask = make_batch(6)
    base = call(rewards, mask, ends, response_mask)
    r_tilde = normalized_process_rewards(rewards, mask, INDEX)
    # Swapping episode k of response 0 with episode 0 of response 1 (same group) keeps the group's
    # mean and std, so every r~ stays put except the two swapped ones. In response 0 only the tokens
    # before episode k's end may move, each by alpha * (new r~ - old r~).
    for k, end in enumerate(ENDS[0]):
        swapped = rewards.clone()
        swapped[0, k], swapped[1, 0] = rewards[1, 0], rewards[0, k]
        delta = call(swapped, mask, ends, response_mask) - base
        step = 0.8 * (r_tilde[1, 0] - r_tilde[0, k])
        assert abs(float(step)) > 1e-2
        torch.testing.assert_close(delta[0, :end], step.expand(end), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta[0, end:], torch.zeros(T - end), rtol=0, atol=1e-5)


def test_normalization_details():
    index = ["g", "g", "h", "i", "i"]
    mask = torch.tensor([[True, False], [True, False], [True, True], [True, False], [False, False]])
    rewards = torch.tensor([[1.0, float("nan")], [3.0, 7.0], [0.2, 0.4], [5.0, 0.0], [9.0, 9.0]])
    r = normalized_process_rewards(rewards, mask, index)
    # group g: values 1, 3 (the NaN and the 7 are not rewarded): unbiased std sqrt(2)
    torch.testing.assert_close(r[0, 0], torch.tensor(-1.0 / (math.sqrt(2) + 1e-6)))
    assert r[0, 1] == 0 and r[1, 1] == 0
    assert torch.isfinite(r).all()
    torch.testing.assert_close(r[2], torch.tensor([-0.1, 0.1]) / (math.sqrt(0.02) + 1e-6))
    # group i: a single rewarded episode -> 0
    assert torch.equal(r[3:], torch.zeros(2, 2))
    # all equal (max == min): exactly 0, even where fp32 rounding would leave a tiny std
    same = torch.full((3, 1), 0.1) * torch.tensor([[1.0], [1.0], [1.0]])
    assert torch.equal(
        normalized_process_rewards(same, torch.ones(3, 1, dtype=torch.bool), ["x"] * 3), torch.zeros(3, 1)
    )
    # without the std division: just centred
    torch.testing.assert_close(
        normalized_process_rewards(rewards, mask, index, norm_adv_by_std_in_grpo=False)[2],
        torch.tensor([-0.1, 0.1]),
    )


def test_values_outside_the_mask_are_ignored_and_holes_allowed():
    rewards, mask, ends, response_mask = make_batch(7)
    mask[0, 1] = False  # a hole: episodes 1 and 3 of response 0 rewarded, 2 not
    garbage_rewards = torch.where(mask, rewards, torch.tensor(float("nan")))
    garbage_ends = torch.where(mask, ends, torch.tensor(10**6))
    adv = call(garbage_rewards, mask, garbage_ends, response_mask)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, call(rewards, mask, ends, response_mask))
    torch.testing.assert_close(
        adv, brute_force(rewards, mask, ends, response_mask, 0.8, True), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("bad_end", [7, 0])
def test_an_end_outside_the_response_is_an_error(bad_end):
    rewards, mask, ends, response_mask = make_batch()
    ends[1, 1] = bad_end  # response 1 has 6 valid tokens
    with pytest.raises(ValueError, match=r"episode_ends\[1, 1\]"):
        call(rewards, mask, ends, response_mask)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("outcome_scores", torch.zeros(5)),
        ("process_rewards", torch.zeros(5, K)),
        ("episode_mask", torch.zeros(6, K + 1, dtype=torch.bool)),
        ("episode_ends", torch.zeros(6, 1, dtype=torch.long)),
        ("index", np.array(["a"] * 5, dtype=object)),
    ],
)
def test_bad_shapes_name_the_argument(name, value):
    rewards, mask, ends, response_mask = make_batch()
    args = [rewards, mask, ends, response_mask]
    keywords = {"outcomes": OUTCOMES, "index": INDEX}
    position = {"process_rewards": 0, "episode_mask": 1, "episode_ends": 2}
    if name in position:
        args[position[name]] = value
    else:
        keywords[{"outcome_scores": "outcomes", "index": "index"}[name]] = value
    with pytest.raises(ValueError, match=name):
        call(*args, **keywords)
