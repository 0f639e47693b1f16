"""The ``l2t`` reward manager of verl's reward loop (``reward.reward_manager.name=l2t``, source register).

:meth:`L2TRewardManager.run_single` scores ONE response with the outcome verifier (the configured
``custom_reward_function``, default ``l2t_verl.scoring.compute_score``). A verifier exception or timeout
(``reward.timeout`` seconds, default :data:`l2t_verl.scoring.call.REWARD_VERIFIER_TIMEOUT_S`, 60;
``+reward.timeout=...``) scores 0 and is counted (docs/method.md section 8). It returns
``reward_score = r_out`` and the outcome fields of the per-sample record
(:func:`l2t_verl.record.outcome_extra_info`).

Only the outcome is scored here. The process rewards need the penalty, which the actor computes after
this point, so the L2T trainer combines the two (:mod:`l2t_verl.step`); ``rm_scores`` keeps verl's own
layout, ``r_out`` on the last response token (the inherited ``assemble_rm_scores``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import register

from l2t_verl.record import outcome_extra_info
from l2t_verl.scoring.call import REWARD_VERIFIER_TIMEOUT_S, call_verifier

__all__ = ["L2TRewardManager"]

logger = logging.getLogger(__name__)


def _decode_response(tokenizer: Any, data_item: Any) -> str:
    response_ids = data_item.batch["responses"]
    response_length = response_ids.shape[-1]
    valid = int(data_item.batch["attention_mask"][-response_length:].sum())
    return tokenizer.decode(response_ids[:valid], skip_special_tokens=True)


@register("l2t")
class L2TRewardManager(RewardManagerBase):
    """The outcome verifier per response, with a timeout and counted failures (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any,
        reward_router_address: str | None = None,
        reward_model_tokenizer: Any = None,
        verifier_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, tokenizer, compute_score)
        if compute_score is None:
            from l2t_verl.scoring import compute_score as default_compute_score

            compute_score = default_compute_score
        self.compute_score = compute_score
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer
        if verifier_timeout_s is None:
            reward_cfg = config.get("reward", {}) if hasattr(config, "get") else {}
            verifier_timeout_s = (reward_cfg or {}).get("timeout", None) or REWARD_VERIFIER_TIMEOUT_S
        self.verifier_timeout_s = float(verifier_timeout_s)

    async def _outcome(self, data_source: Any, solution: str, ground_truth: Any, extra_info: dict) -> float:
        extra_kwargs = (
            {
                "reward_router_address": self.reward_router_address,
                "reward_model_tokenizer": self.reward_model_tokenizer,
            }
            if self.reward_router_address is not None
            else {}
        )
        return await call_verifier(
            self.compute_score,
            self.verifier_timeout_s,
            data_source=data_source,
            solution_str=solution,
            ground_truth=ground_truth,
            extra_info=extra_info,
            **extra_kwargs,
        )

    async def run_single(self, data: DataProto) -> dict:
        data_item = data[-1:][0]  # multi-output trajectories are scored on their last output, as in naive
        ntb = data_item.non_tensor_batch
        data_source = ntb.get("data_source")
        reward_model = ntb.get("reward_model") or {}
        ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None
        extra_info = dict(ntb.get("extra_info") or {})  # a copy: the dataset row must stay untouched
        tool_extra_fields = ntb.get("tool_extra_fields")
        if isinstance(tool_extra_fields, Mapping):
            extra_info.update(tool_extra_fields)
        extra_info["num_turns"] = ntb.get("__num_turns__")
        extra_info["rollout_reward_scores"] = ntb.get("reward_scores", {})

        verifier_error = 0
        try:
            solution = await self.loop.run_in_executor(None, _decode_response, self.tokenizer, data_item)
            outcome = await self._outcome(data_source, solution, ground_truth, extra_info)
        except Exception as exc:  # TimeoutError included: a verifier failure is a 0, not a lost step
            logger.warning(
                "outcome verifier failed for data_source=%r (%s: %s): score 0",
                data_source,
                type(exc).__name__,
                exc,
            )
            outcome, verifier_error = 0.0, 1
        return {
            "reward_score": outcome,
            "reward_extra_info": outcome_extra_info(outcome, bool(verifier_error)),
        }
