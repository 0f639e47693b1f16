"""The L2T advantage: process-supervised GRPO (docs/method.md §5).

For response ``i`` of a prompt group and response token ``t``::

    A_it = A_out_i + alpha * sum of r~_ik over the rewarded episodes k of i with end_ik > t

- ``A_out_i``: verl's GRPO on the scalar outcomes ``r_out`` within the prompt group (its own
  ``compute_grpo_outcome_advantage``, so a group of one has mean 0 and std 1, as in verl).
- ``r~_ik = (r_ik - mean_G) / (std_G + eps)``: the process rewards normalised over all rewarded
  episodes of the group (unbiased std; no division when ``norm_adv_by_std_in_grpo`` is off), and
  exactly 0 for a group with fewer than 2 rewarded episodes or with all of them equal.

Tokens at or after a response's last rewarded episode end (the answer tail), responses with no
episode and responses whose probes failed get ``A_out_i`` only; padding gets 0. The outcome and
process rewards arrive separately: verl's ``grpo`` sums token rewards per sequence and would erase
the dense signal, so it is not reused on them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

__all__ = ["L2T_ADV_ESTIMATOR", "advantage_parts", "l2t_advantage", "normalized_process_rewards"]

# ``algorithm.adv_estimator`` of ``algo=l2t``. verl's own trainers look estimators up by this name;
# the L2T trainer does not (it calls :func:`l2t_advantage` with the two reward parts), so it is not
# registered with verl: ``l2t_verl.main`` refuses it without the L2T trainer instead of letting verl
# run something else under its name.
L2T_ADV_ESTIMATOR = "l2t"


def _check_shapes(
    outcome_scores: torch.Tensor,
    process_rewards: torch.Tensor,
    episode_mask: torch.Tensor,
    episode_ends: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
) -> None:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [batch, response_len]; got {tuple(response_mask.shape)}")
    batch = response_mask.shape[0]
    if tuple(outcome_scores.shape) != (batch,):
        raise ValueError(f"outcome_scores must have shape ({batch},); got {tuple(outcome_scores.shape)}")
    if process_rewards.dim() != 2 or process_rewards.shape[0] != batch:
        raise ValueError(f"process_rewards must be [{batch}, K]; got {tuple(process_rewards.shape)}")
    for name, value in (("episode_mask", episode_mask), ("episode_ends", episode_ends)):
        if value.shape != process_rewards.shape:
            raise ValueError(
                f"{name} must have the shape of process_rewards {tuple(process_rewards.shape)}; "
                f"got {tuple(value.shape)}"
            )
    if index is None or len(index) != batch:
        got = None if index is None else len(index)
        raise ValueError(f"index must hold one prompt group id per response ({batch}); got {got}")


def normalized_process_rewards(
    process_rewards: torch.Tensor,
    episode_mask: torch.Tensor,
    index: Any,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """``r~`` [B, K]: each rewarded ``r_ik`` normalised over the rewarded episodes of its prompt group.

    0 where ``episode_mask`` is False, and for a group with fewer than 2 rewarded episodes or whose
    rewarded episodes are all equal (max == min, so that fp32 rounding cannot turn a constant into a
    tiny non-zero std and then into noise of unit size).
    """
    mask = episode_mask.bool()
    values = torch.where(mask, process_rewards, torch.zeros_like(process_rewards))
    out = torch.zeros_like(values)
    rows_of: dict[Any, list[int]] = defaultdict(list)
    for row, uid in enumerate(index):
        rows_of[uid].append(row)
    for rows in rows_of.values():
        rows_t = torch.tensor(rows, dtype=torch.long, device=values.device)
        group_mask = mask[rows_t]
        group = values[rows_t][group_mask]
        if group.numel() < 2 or bool(group.max() == group.min()):
            continue
        centred = group - group.mean()
        if norm_adv_by_std_in_grpo:
            centred = centred / (group.std(unbiased=True) + epsilon)
        block = torch.zeros_like(values[rows_t])
        block[group_mask] = centred
        out[rows_t] = block
    return out


def advantage_parts(
    outcome_scores: torch.Tensor,
    normalized_process: torch.Tensor,
    episode_mask: torch.Tensor,
    episode_ends: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    alpha: float,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outcome part ``A_out`` and the process part ``alpha * sum_{end > t} r~`` of the
    advantage, each ``[B, T]`` and 0 on padding. ``normalized_process`` is ``r~``
    (:func:`normalized_process_rewards`)."""
    valid = response_mask.bool()
    mask = episode_mask.bool()
    lengths = valid.sum(dim=-1)
    ends = episode_ends.long()
    bad = mask & ((ends < 1) | (ends > lengths[:, None]))
    if bool(bad.any()):
        row, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"episode_ends[{row}, {k}] = {int(ends[row, k])} is outside [1, {int(lengths[row])}], "
            f"the valid length of response {row}"
        )

    # Imported here, not at module level: `import verl` loads this package's verl plugin, which imports
    # the trainer, which imports this module's callers; the math modules stay importable first.
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    outcome, _ = compute_grpo_outcome_advantage(
        token_level_rewards=outcome_scores.unsqueeze(-1).clone(),
        response_mask=torch.ones_like(outcome_scores).unsqueeze(-1),
        index=np.asarray(index, dtype=object),
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    outcome_part = outcome.to(response_mask.device) * valid

    # r~_ik sits on episode k's last token (end - 1); a reverse cumulative sum then gives every
    # token t the sum over the episodes with end > t. O(B * T), whatever K is.
    width = response_mask.shape[-1]
    placed = torch.zeros(response_mask.shape[0], width + 1, dtype=outcome_part.dtype, device=valid.device)
    slots = torch.where(mask, ends - 1, torch.full_like(ends, width))  # unrewarded -> a spare column
    placed.scatter_add_(1, slots, torch.where(mask, normalized_process, 0).to(placed.dtype))
    to_go = placed[:, :width].flip(-1).cumsum(-1).flip(-1)
    return outcome_part, alpha * to_go * valid


def l2t_advantage(
    outcome_scores: torch.Tensor,
    process_rewards: torch.Tensor,
    episode_mask: torch.Tensor,
    episode_ends: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    alpha: float = 0.8,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2T advantages and returns (equal, both ``[B, T]``), docs/method.md §5.

    Args:
        outcome_scores: ``[B]`` float, ``r_out``.
        process_rewards: ``[B, K]`` float, ``r_k = delta_J_k - beta * p_hat_k``; any value where
            ``episode_mask`` is False (it is ignored there, NaN included).
        episode_mask: ``[B, K]`` bool, episode k exists and is rewarded (its response's probes
            did not fail). Holes are allowed.
        episode_ends: ``[B, K]`` long, exclusive end index of episode k in the response; ignored
            where ``episode_mask`` is False. A rewarded end outside ``[1, valid length]`` is a
            ``ValueError``.
        response_mask: ``[B, T]`` valid response tokens.
        index: ``[B]`` prompt group ids (verl's ``uid`` array).
        alpha: weight of the process part.
        norm_adv_by_std_in_grpo: divide by the group std (GRPO) or not (Dr.GRPO), for both parts.
        epsilon: added to every group std.
    """
    outcome_scores = torch.as_tensor(outcome_scores, dtype=torch.float32, device=response_mask.device)
    _check_shapes(outcome_scores, process_rewards, episode_mask, episode_ends, response_mask, index)
    with torch.no_grad():
        r_tilde = normalized_process_rewards(
            process_rewards.float(), episode_mask, index, norm_adv_by_std_in_grpo, epsilon
        )
        outcome_part, process_part = advantage_parts(
            outcome_scores,
            r_tilde,
            episode_mask,
            episode_ends,
            response_mask,
            index,
            alpha,
            norm_adv_by_std_in_grpo,
            epsilon,
        )
        advantages = outcome_part + process_part
    return advantages, advantages.clone()
