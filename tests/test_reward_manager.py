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

from l2t_verl.record import SampleRecord
from l2t_verl.reward_manager import L2TRewardManager

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


# ------------------------------------------------------------------------------------ rm_scores


def test_rm_scores_are_verls_outcome_on_the_last_token_whatever_the_l2t_fields():
    """The process rewards need the actor's penalty, so only the trainer combines them: the reward
    manager must not place anything but r_out (no second placement path to disagree with the trainer)."""
    extra = [{"l2t_episode_ends": [1, 2], "l2t_delta_j": [0.1, 0.2], "l2t_probe_failed": False}, {}]
    data = batch([6, 3], non_tensor={"extra_fields": objects(extra)})
    scores = [1.0, 0.0]
    assert "assemble_rm_scores" not in vars(L2TRewardManager)
    torch.testing.assert_close(
        L2TRewardManager.assemble_rm_scores(data, scores), RewardManagerBase.assemble_rm_scores(data, scores)
    )


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
        "tool_extra_fields": objects(
            [SampleRecord(episode_ends=(2,), jr=(0.1, 0.6), delta_j=(0.5,)).to_extra_fields()]
        ),
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
    # What the trainer reads back from the same extra_fields: the record owns both sides' names.
    record = SampleRecord.from_extra_fields({"reward_extra_info": right["reward_extra_info"]})
    assert record.outcome == 1.0 and not record.outcome_verifier_error
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
