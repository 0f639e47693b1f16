"""The ``l2t`` reward manager: outcome scoring with counted verifier failures, dense token rewards."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from l2t_verl.reward_manager import L2TFields, L2TRewardManager, dense_response_rewards, l2t_fields_of_row
from l2t_verl.rewards import dense_token_rewards

EXTRA_KEYS = {"acc", "l2t_outcome", "l2t_verifier_error"}


def objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def batch(valid_lengths, prompt_width=3, response_width=8, non_tensor=None) -> DataProto:
    """Right-padded responses of the given valid lengths, as verl lays out a batch."""
    n = len(valid_lengths)
    response_mask = torch.zeros(n, response_width, dtype=torch.long)
    for i, length in enumerate(valid_lengths):
        response_mask[i, :length] = 1
    attention_mask = torch.cat([torch.ones(n, prompt_width, dtype=torch.long), response_mask], dim=1)
    td = TensorDict(
        {
            "prompts": torch.ones(n, prompt_width, dtype=torch.long),
            "responses": torch.full((n, response_width), 5, dtype=torch.long) * response_mask,
            "attention_mask": attention_mask,
        },
        batch_size=n,
    )
    return DataProto(batch=td, non_tensor_batch=dict(non_tensor or {}))


# ------------------------------------------------------------------------------------ assemble_rm_scores


def test_assemble_rm_scores_places_outcome_and_alpha_delta_j_exactly():
    rows = [
        # ends [2, 5] of 6 valid tokens: alpha*dJ on tokens 1 and 4, r_out on token 5
        dict(ends=[2, 5], dj=[0.5, -0.25], failed=False),
        # probes failed: outcome only
        dict(ends=[2, 4], dj=[], failed=True),
        # the last episode ends on the last valid token: both land there and add up
        dict(ends=[1, 3], dj=[0.25, 0.5], failed=False),
        # K = 0 (no reasoning span): outcome only
        dict(ends=[], dj=[], failed=False),
    ]
    data = batch(
        [6, 5, 3, 4],
        non_tensor={
            "l2t_episode_ends": objects([r["ends"] for r in rows]),
            "l2t_delta_j": objects([r["dj"] for r in rows]),
            "l2t_probe_failed": objects([r["failed"] for r in rows]),
            "l2t_alpha": objects([0.8] * 4),
        },
    )
    got = L2TRewardManager.assemble_rm_scores(data, [1.0, 1.0, 0.0, 1.0])
    expected = torch.tensor(
        [
            [0.0, 0.4, 0.0, 0.0, -0.2, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            [0.2, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32 and got.shape == data.batch["responses"].shape


def test_assemble_rm_scores_reads_v1_extra_fields_dicts_and_falls_back_to_outcome_only():
    extra = [
        {"l2t_episode_ends": [1, 2], "l2t_delta_j": [0.1, 0.2], "l2t_probe_failed": False, "l2t_alpha": 1.0},
        {"turn_scores": []},  # a row from another agent loop: outcome only
    ]
    data = batch([3, 3], non_tensor={"extra_fields": objects(extra)})
    got = L2TRewardManager.assemble_rm_scores(data, [1.0, 1.0])
    torch.testing.assert_close(got[0, :3], torch.tensor([0.1, 0.2, 1.0]))
    torch.testing.assert_close(got[1, :3], torch.tensor([0.0, 0.0, 1.0]))


def test_without_l2t_fields_it_equals_verls_outcome_on_last_token():
    data = batch([6, 1, 8])
    scores = [1.0, 0.0, 1.0]
    torch.testing.assert_close(
        L2TRewardManager.assemble_rm_scores(data, scores), RewardManagerBase.assemble_rm_scores(data, scores)
    )


def test_inconsistent_fields_give_outcome_only_not_a_crash():
    past_end = L2TFields(episode_ends=(2, 9), delta_j=(0.1, 0.2), alpha=0.8)
    torch.testing.assert_close(dense_response_rewards(4, 1.0, past_end), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    wrong_count = L2TFields(episode_ends=(1, 2), delta_j=(0.1,), alpha=0.8)
    assert not wrong_count.process_active
    torch.testing.assert_close(dense_response_rewards(3, 1.0, wrong_count), torch.tensor([0.0, 0.0, 1.0]))
    malformed = L2TFields.from_mapping({"l2t_episode_ends": ["x"], "l2t_alpha": 0.8})
    assert malformed.probe_failed and not malformed.process_active


def test_dense_response_rewards_is_the_spec_placement():
    fields = L2TFields(episode_ends=(2, 4), delta_j=(0.3, -0.1), alpha=0.5)
    torch.testing.assert_close(
        dense_response_rewards(6, 1.0, fields), dense_token_rewards(6, [2, 4], 1.0, [0.3, -0.1], 0.5)
    )


def test_l2t_fields_of_row_reads_every_layout():
    cols = {"l2t_episode_ends": objects([[3]]), "l2t_delta_j": objects([[0.5]]), "l2t_alpha": objects([0.8])}
    assert l2t_fields_of_row(cols, 0) == L2TFields((3,), (0.5,), False, 0.8)
    tool = {"tool_extra_fields": objects([{"l2t_episode_ends": [3], "l2t_delta_j": [0.5], "l2t_alpha": 0.8}])}
    assert l2t_fields_of_row(tool, 0) == L2TFields((3,), (0.5,), False, 0.8)
    assert l2t_fields_of_row({}, 0) == L2TFields()


def test_registered_and_resolved_by_verl():
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    config = OmegaConf.create({"reward": {"reward_manager": {"source": "register", "name": "l2t"}}})
    assert resolve_reward_manager_cls(config) is L2TRewardManager


# ------------------------------------------------------------------------------------------ run_single


def one_row(tokenizer, text: str, ground_truth="42", data_source="l2t_arith") -> DataProto:
    ids = tokenizer.encode(text, add_special_tokens=False)
    data = batch([len(ids)], response_width=len(ids) + 2)
    data.batch["responses"][0, : len(ids)] = torch.tensor(ids)
    data.non_tensor_batch = {
        "data_source": objects([data_source]),
        "reward_model": objects([{"style": "rule", "ground_truth": ground_truth}]),
        "extra_info": objects([{"index": 0}]),
        "tool_extra_fields": objects([{"l2t_episode_ends": [2], "l2t_delta_j": [0.5], "l2t_alpha": 0.8}]),
        "__num_turns__": np.array([2]),
    }
    return data


def make_manager(tokenizer, compute_score=None, **kwargs) -> L2TRewardManager:
    config = OmegaConf.create({"reward": {"reward_manager": {"name": "l2t"}}})
    return L2TRewardManager(config=config, tokenizer=tokenizer, compute_score=compute_score, **kwargs)


async def test_run_single_scores_the_outcome_with_the_default_verifier(tiny_tokenizer):
    manager = make_manager(tiny_tokenizer)
    right = await manager.run_single(one_row(tiny_tokenizer, "The answer is \\boxed{42}."))
    wrong = await manager.run_single(one_row(tiny_tokenizer, "The answer is \\boxed{7}."))
    assert right == {
        "reward_score": 1.0,
        "reward_extra_info": {"acc": 1.0, "l2t_outcome": 1.0, "l2t_verifier_error": 0},
    }
    assert wrong["reward_score"] == 0.0 and wrong["reward_extra_info"]["l2t_verifier_error"] == 0


async def test_verifier_exception_scores_zero_and_is_counted(tiny_tokenizer):
    seen = {}

    def crashing(data_source, solution_str, ground_truth, extra_info, **kwargs):
        seen.update(extra_info)
        raise RuntimeError("sandbox died")

    data = one_row(tiny_tokenizer, "The answer is \\boxed{42}.")
    out = await make_manager(tiny_tokenizer, crashing).run_single(data)
    assert out["reward_score"] == 0.0
    assert out["reward_extra_info"] == {"acc": 0.0, "l2t_outcome": 0.0, "l2t_verifier_error": 1}
    assert set(out["reward_extra_info"]) == EXTRA_KEYS  # same keys as a success: verl stacks them
    # the verifier saw the agent loop's fields, as verl's naive manager passes them; the row did not change
    assert seen["l2t_episode_ends"] == [2] and data.non_tensor_batch["extra_info"][0] == {"index": 0}


async def test_unknown_data_source_and_timeout_score_zero_and_are_counted(tiny_tokenizer):
    unknown = await make_manager(tiny_tokenizer).run_single(
        one_row(tiny_tokenizer, "\\boxed{42}", data_source="no_such_task")
    )
    assert unknown["reward_score"] == 0.0 and unknown["reward_extra_info"]["l2t_verifier_error"] == 1

    def slow(**kwargs):
        time.sleep(0.5)
        return 1.0

    manager = make_manager(tiny_tokenizer, slow, verifier_timeout_s=0.05)
    out = await manager.run_single(one_row(tiny_tokenizer, "\\boxed{42}"))
    assert out["reward_score"] == 0.0 and out["reward_extra_info"]["l2t_verifier_error"] == 1


async def test_async_and_dict_returning_verifiers(tiny_tokenizer):
    async def async_verifier(data_source, solution_str, ground_truth, extra_info):
        await asyncio.sleep(0)
        return {"score": 1.0, "other": "ignored"}

    out = await make_manager(tiny_tokenizer, async_verifier).run_single(one_row(tiny_tokenizer, "x"))
    assert out["reward_score"] == 1.0 and set(out["reward_extra_info"]) == EXTRA_KEYS


def test_verifier_timeout_comes_from_reward_timeout(tiny_tokenizer):
    async def build():
        config = OmegaConf.create({"reward": {"timeout": 7.5}})
        return L2TRewardManager(config=config, tokenizer=tiny_tokenizer, compute_score=None)

    assert asyncio.run(build()).verifier_timeout_s == 7.5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_non_finite_verifier_score_is_a_verifier_error(tiny_tokenizer, value):
    out = await make_manager(tiny_tokenizer, lambda **kw: value).run_single(one_row(tiny_tokenizer, "x"))
    assert out["reward_score"] == 0.0 and out["reward_extra_info"]["l2t_verifier_error"] == 1
