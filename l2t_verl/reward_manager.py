"""The ``l2t`` reward manager of verl's reward loop (``reward.reward_manager.name=l2t``, source register).

Rewards (L2T_SPEC.md section 4): ``r_out`` on the last valid response token plus
``alpha * delta_J_k`` on episode k's last token. The penalty part ``-alpha * beta * p_hat_k`` is
NOT added here: the actor computes ``p_hat`` after old-log-prob and the L2T trainer subtracts it.

- :meth:`L2TRewardManager.run_single` scores ONE response with the outcome verifier (the
  configured ``custom_reward_function``, default ``l2t_verl.scoring.compute_score``). A verifier
  exception or timeout (``reward.timeout`` seconds, default 60; ``+reward.timeout=...``) scores
  0 and sets ``l2t_verifier_error`` (spec 8). It returns ``reward_score = r_out`` and a
  ``reward_extra_info`` with a FIXED key set of scalars (verl stacks it column-wise and indexes
  every sample by the first sample's keys): ``acc`` and ``l2t_outcome`` (both ``r_out``) and
  ``l2t_verifier_error`` (0/1).
- :meth:`L2TRewardManager.assemble_rm_scores` turns the per-sample outcomes of a batch into the
  dense ``rm_scores`` tensor, reading each sample's ``l2t_*`` fields (written by the ``l2t``
  agent loop) from the batch. Outcome only when those fields are missing, progress is off, or
  the probes failed.
- :func:`dense_response_rewards` is the placement, reusable by the driver: on verl's streaming
  reward path (rule-based rewards computed inside the rollout workers, which is what the v1
  trainer uses) ``assemble_rm_scores`` is never called and ``rm_scores`` carries ``r_out`` on
  the last token only, so the L2T trainer builds the dense reward from the ``l2t_*`` fields.
  See ``l2t_verl.agent_loop`` for where every field lands.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import register

from l2t_verl.rewards import dense_token_rewards

__all__ = [
    "DEFAULT_VERIFIER_TIMEOUT_S",
    "L2T_FIELD_KEYS",
    "L2TFields",
    "L2TRewardManager",
    "dense_response_rewards",
    "l2t_fields_of_row",
]

logger = logging.getLogger(__name__)

DEFAULT_VERIFIER_TIMEOUT_S = 60.0

# Per-sample fields the `l2t` agent loop writes into AgentLoopOutput.extra_fields.
L2T_FIELD_KEYS = (
    "l2t_episode_ends",
    "l2t_jr",
    "l2t_delta_j",
    "l2t_probe_failed",
    "l2t_probe_tokens",
    "l2t_probe_time_s",
    "l2t_verifier_errors",
    "l2t_alpha",
)


@dataclass(frozen=True)
class L2TFields:
    """The ``l2t_*`` fields of one sample, parsed.

    ``process_active``: the sample carries a usable process reward (one ``delta_J`` per episode,
    probes did not fail). When it is False the sample gets the outcome reward only; the L2T
    trainer must then skip its penalty too (spec 8: "no process reward").
    """

    episode_ends: tuple[int, ...] = ()
    delta_j: tuple[float, ...] = ()
    probe_failed: bool = False
    alpha: float | None = None

    @property
    def process_active(self) -> bool:
        return (
            not self.probe_failed
            and self.alpha is not None
            and len(self.episode_ends) > 0
            and len(self.delta_j) == len(self.episode_ends)
        )

    @classmethod
    def from_mapping(cls, extra: Mapping[str, Any] | None) -> L2TFields:
        """Parse an ``extra_fields``-like mapping; missing or malformed fields give outcome only."""
        if not extra:
            return cls()
        try:
            ends = tuple(int(e) for e in _as_list(extra.get("l2t_episode_ends")))
            delta = tuple(float(d) for d in _as_list(extra.get("l2t_delta_j")))
            alpha = extra.get("l2t_alpha")
            alpha = None if alpha is None else float(alpha)
            failed = bool(extra.get("l2t_probe_failed") or False)
        except (TypeError, ValueError):
            logger.warning("malformed l2t fields %r: outcome reward only", dict(extra), exc_info=True)
            return cls(probe_failed=True)
        return cls(episode_ends=ends, delta_j=delta, probe_failed=failed, alpha=alpha)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def dense_response_rewards(
    response_len: int, outcome: float, fields: L2TFields, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Token rewards of one response: ``r_out`` on token ``response_len - 1`` and, when the sample's
    process reward is active, ``alpha * delta_J_k`` on token ``episode_ends[k] - 1``.

    Inconsistent fields (an episode end past the response, a non-finite delta) are logged and
    give the outcome reward only, never a crash in the middle of a step.
    """
    if fields.process_active:
        try:
            return dense_token_rewards(
                response_len, fields.episode_ends, outcome, fields.delta_j, fields.alpha, dtype=dtype
            )
        except ValueError:
            logger.warning(
                "l2t process reward dropped for a response of %d tokens (ends=%s, delta_j=%s)",
                response_len,
                list(fields.episode_ends),
                list(fields.delta_j),
                exc_info=True,
            )
    return dense_token_rewards(response_len, [], outcome, [], 0.0, dtype=dtype)


def l2t_fields_of_row(non_tensor_batch: Mapping[str, Any], i: int) -> L2TFields:
    """The ``l2t_*`` fields of row ``i`` of a verl batch, wherever verl put them.

    - the legacy ``AgentLoopWorker._postprocess`` spreads ``extra_fields`` into one
      ``non_tensor_batch`` column per key (``l2t_episode_ends``, ...);
    - the v1 TransferQueue path keeps one ``extra_fields`` dict per sample;
    - the streaming reward call passes them as ``tool_extra_fields``.
    """
    if "l2t_episode_ends" in non_tensor_batch:
        return L2TFields.from_mapping(
            {k: non_tensor_batch[k][i] for k in L2T_FIELD_KEYS if k in non_tensor_batch}
        )
    for key in ("extra_fields", "tool_extra_fields"):
        if key in non_tensor_batch:
            row = non_tensor_batch[key][i]
            if isinstance(row, Mapping):
                return L2TFields.from_mapping(row)
    return L2TFields()


def _decode_response(tokenizer: Any, data_item: Any) -> str:
    response_ids = data_item.batch["responses"]
    response_length = response_ids.shape[-1]
    valid = int(data_item.batch["attention_mask"][-response_length:].sum())
    return tokenizer.decode(response_ids[:valid], skip_special_tokens=True)


@register("l2t")
class L2TRewardManager(RewardManagerBase):
    """Outcome verifier per response (``run_single``) and dense L2T token rewards (``assemble_rm_scores``)."""

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
        # inspect unwraps functools.partial, which is how verl wraps custom reward functions.
        self.is_async_reward_score = inspect.iscoroutinefunction(compute_score)
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer
        if verifier_timeout_s is None:
            reward_cfg = config.get("reward", {}) if hasattr(config, "get") else {}
            verifier_timeout_s = (reward_cfg or {}).get("timeout", None) or DEFAULT_VERIFIER_TIMEOUT_S
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
        call = dict(
            data_source=data_source, solution_str=solution, ground_truth=ground_truth, extra_info=extra_info
        )
        if self.is_async_reward_score:
            pending = self.compute_score(**call, **extra_kwargs)
        else:
            # In a thread: verifiers are synchronous and may be slow (sympy, sandboxed tests).
            pending = self.loop.run_in_executor(None, lambda: self.compute_score(**call, **extra_kwargs))
        result = await asyncio.wait_for(pending, self.verifier_timeout_s)
        if isinstance(result, dict):
            result = result["score"]
        score = float(result)
        if not math.isfinite(score):
            raise ValueError(f"verifier returned a non-finite score {score!r}")
        return score

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
            "reward_extra_info": {
                "acc": outcome,
                "l2t_outcome": outcome,
                "l2t_verifier_error": verifier_error,
            },
        }

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: Sequence[float]) -> torch.Tensor:
        """Dense ``rm_scores`` ``[B, response_width]``: ``r_out`` on each row's last valid response
        token plus ``alpha * delta_J_k`` on episode k's last token (outcome only for rows without
        usable ``l2t_*`` fields, see :func:`l2t_fields_of_row`)."""
        prompt_length = data.batch["prompts"].size(1)
        valid_lengths = data.batch["attention_mask"][:, prompt_length:].sum(dim=1).tolist()
        rm_scores = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
        ntb = data.non_tensor_batch if data.non_tensor_batch is not None else {}
        for i, (length, score) in enumerate(zip(valid_lengths, scores, strict=True)):
            length = int(length)
            if length == 0:
                continue  # no token to carry a reward
            row = dense_response_rewards(length, float(score), l2t_fields_of_row(ntb, i))
            rm_scores[i, :length] = row.to(rm_scores.device)
        return rm_scores
