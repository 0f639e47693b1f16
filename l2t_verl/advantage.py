"""The ``l2t`` advantage estimator (L2T_SPEC.md section 5), registered with verl.

``A_t = outcome part + process part`` for every valid response token, where

- outcome part: GRPO within the prompt group, ``(r_out - mean_g) / (std_g + eps)`` (or without
  the std division when ``norm_adv_by_std_in_grpo`` is off), the same for every token. It is
  computed by verl's own ``compute_grpo_outcome_advantage`` on the scalar outcomes, so it follows
  verl's conventions bit for bit (a group of one has mean 0 and std 1; std is unbiased);
- process part: the return-to-go ``R_t = sum of alpha * r_k over episodes ending at or after t``
  (gamma = 1), whitened over all valid response tokens of the batch.

verl's ``grpo`` would sum the token rewards per sequence and erase the dense process signal,
so it is not reused on the dense rewards.

Calling convention: verl's ``compute_advantage`` calls a registered estimator with
``token_level_rewards``, ``response_mask``, ``config`` and ``index`` (the ``uid``s) only. The
dense rewards alone cannot be split into outcome and process parts when the last episode ends
on the last token, so the L2T driver must pass ``outcome_scores`` (e.g. from the reward
manager's extra info); without it only outcome-only batches are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, register_adv_est
from verl.utils.torch_functional import masked_var, masked_whiten

__all__ = ["L2T_ADV_ESTIMATOR", "compute_l2t_advantage"]

L2T_ADV_ESTIMATOR = "l2t"
# Below this variance the returns are constant over the batch: whitening would divide ~0 by ~0
# and a constant carries no relative signal, so the process part is exactly 0 instead.
_MIN_PROCESS_VAR = 1e-12


def _config_get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):  # AlgoConfig, DictConfig and dict all have .get
        return config.get(key, default)
    return getattr(config, key, default)


def _last_valid_index(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each row's last valid token, and whether the row has any valid token."""
    valid = response_mask.bool()
    width = valid.shape[-1]
    last = width - 1 - valid.flip(-1).int().argmax(dim=-1)
    return last, valid.any(dim=-1)


def _check_inputs(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None,
    outcome_scores: torch.Tensor | None,
) -> None:
    if token_level_rewards.dim() != 2:
        raise ValueError(
            f"token_level_rewards must be [batch, response_len]; got {tuple(token_level_rewards.shape)}"
        )
    batch = token_level_rewards.shape[0]
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"response_mask must have the shape of token_level_rewards {tuple(token_level_rewards.shape)}; "
            f"got {tuple(response_mask.shape)}"
        )
    if index is None:
        raise ValueError("index (the prompt group id of each response, verl's 'uid') is required for l2t")
    if len(index) != batch:
        raise ValueError(f"index must have one group id per response ({batch}); got {len(index)}")
    if outcome_scores is not None and tuple(outcome_scores.shape) != (batch,):
        raise ValueError(f"outcome_scores must have shape ({batch},); got {tuple(outcome_scores.shape)}")


def _process_part(process_rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Whitened return-to-go of the (already masked) process rewards (spec 5)."""
    returns = process_rewards.flip(-1).cumsum(-1).flip(-1)
    if int(valid.sum()) < 2:
        return torch.zeros_like(returns)
    if float(masked_var(returns, valid)) < _MIN_PROCESS_VAR:
        return torch.zeros_like(returns)
    return masked_whiten(returns, valid) * valid


@register_adv_est(L2T_ADV_ESTIMATOR)
def compute_l2t_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    outcome_scores: torch.Tensor | None = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2T advantages and returns (both ``[B, T]``, equal), spec 5.

    Args:
        token_level_rewards: ``[B, T]`` dense rewards: ``r_out`` on the last valid token plus
            ``alpha * r_k`` on each episode's last token (``l2t_verl.rewards.dense_token_rewards``).
        response_mask: ``[B, T]`` valid response tokens.
        index: ``[B]`` prompt group ids (verl passes ``non_tensor_batch["uid"]``).
        config: verl's ``AlgoConfig``; supplies ``norm_adv_by_std_in_grpo`` when the argument
            of that name is not given (verl calls registered estimators with ``config`` only).
        outcome_scores: ``[B]`` (tensor or array) outcome rewards ``r_out``, used to split the
            dense rewards into outcome and process parts. When omitted, the rewards must sit on
            the last valid token only (an outcome-only batch, e.g. every probe failed) and their
            row sums are the outcomes; anything else raises ``ValueError``, because an outcome
            and a process reward sharing the last token cannot be told apart. verl's trainers
            do not pass this argument: the L2T trainer must (see the module docstring).
        epsilon: added to the group std, as in verl's GRPO.
        norm_adv_by_std_in_grpo: divide the outcome part by the group std (GRPO) or not (Dr.GRPO).
        **kwargs: other inputs verl passes to estimators; ignored.
    """
    if outcome_scores is not None:
        outcome_scores = torch.as_tensor(outcome_scores)
    _check_inputs(token_level_rewards, response_mask, index, outcome_scores)
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_config_get(config, "norm_adv_by_std_in_grpo", True))

    with torch.no_grad():
        batch = token_level_rewards.shape[0]
        rows = torch.arange(batch, device=token_level_rewards.device)
        last, has_tokens = _last_valid_index(response_mask)
        if outcome_scores is None:
            off_last = token_level_rewards.clone()
            off_last[rows, last] = 0
            if bool((off_last != 0).any()):
                raise ValueError(
                    "outcome_scores is required for l2t when token_level_rewards has rewards before the last "
                    "valid token (process rewards): pass the L2T reward manager's outcome scores"
                )
            outcome_scores = token_level_rewards.sum(dim=-1)
        outcome_scores = outcome_scores.to(device=token_level_rewards.device, dtype=token_level_rewards.dtype)
        outcome_at_last = torch.zeros_like(token_level_rewards)
        outcome_at_last[rows, last] = torch.where(has_tokens, outcome_scores, 0)

        # verl's GRPO on one scalar per response, broadcast over the response exactly as verl does.
        outcome_part, _ = compute_grpo_outcome_advantage(
            token_level_rewards=outcome_scores.unsqueeze(-1).clone(),
            response_mask=torch.ones_like(outcome_scores).unsqueeze(-1),
            index=index,
            epsilon=epsilon,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        )
        outcome_part = outcome_part * response_mask

        valid = response_mask.bool()
        process_rewards = torch.where(valid, token_level_rewards - outcome_at_last, 0)
        advantages = outcome_part + _process_part(process_rewards, valid)
    return advantages, advantages
