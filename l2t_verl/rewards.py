"""L2T rewards (L2T_SPEC.md section 4): pure functions, no verl import.

- process reward of episode k:  ``r_k = delta_J_k - beta * p_hat_k``
- penalty scale (spec 3):       ``p_hat_k = p_k / (mean p over the batch's episodes + 1e-8)``
- token placement:              ``r_out`` on the last valid response token, ``alpha * r_k`` on
  episode k's last token, so the per-response sum is eq. 5's ``r_out + alpha * sum_k r_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["PENALTY_NORMALIZE_MODES", "dense_token_rewards", "normalize_penalties", "process_rewards"]

PENALTY_NORMALIZE_MODES = ("batch_mean", "none")
_MEAN_EPS = 1e-8  # spec 3


def process_rewards(delta_j: Sequence[float], penalties_hat: Sequence[float], beta: float) -> list[float]:
    """``r_k = delta_J_k - beta * p_hat_k`` for k = 1..K (spec 4)."""
    if len(delta_j) != len(penalties_hat):
        raise ValueError(
            f"delta_j and penalties_hat must have one entry per episode; got {len(delta_j)} and "
            f"{len(penalties_hat)}"
        )
    return [float(d) - beta * float(p) for d, p in zip(delta_j, penalties_hat, strict=True)]


def normalize_penalties(
    raw: torch.Tensor, mask: torch.Tensor, mode: str = "batch_mean"
) -> tuple[torch.Tensor, int]:
    """Scale raw episode penalties ``raw`` [B, K] over the valid episodes ``mask`` [B, K].

    ``batch_mean``: ``p_hat = p / (mean of p over valid episodes + 1e-8)`` (spec 3), which makes
    ``beta`` independent of the penalty's absolute size; ``none``: ``p_hat = p``.
    Non-finite valid entries are set to 0 before the mean and counted (spec 8,
    ``l2t/penalty_nonfinite``), so one bad episode cannot poison the whole batch. Invalid
    (padding) entries are 0 in the output.

    Returns ``(p_hat, n_nonfinite)``.
    """
    if mode not in PENALTY_NORMALIZE_MODES:
        raise ValueError(
            f"l2t.penalty.normalize must be one of {list(PENALTY_NORMALIZE_MODES)}; got {mode!r}"
        )
    if raw.shape != mask.shape:
        raise ValueError(f"mask must have the shape of raw {tuple(raw.shape)}; got {tuple(mask.shape)}")
    valid = mask.bool()
    finite = torch.isfinite(raw)
    n_nonfinite = int((valid & ~finite).sum().item())
    p = torch.where(valid & finite, raw, torch.zeros_like(raw))
    if mode == "none" or not bool(valid.any()):
        return p, n_nonfinite
    mean = p.sum() / valid.sum()
    return p / (mean + _MEAN_EPS), n_nonfinite


def dense_token_rewards(
    response_len: int,
    episode_ends: Sequence[int],
    outcome: float,
    process: Sequence[float],
    alpha: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token rewards of one response of ``response_len`` valid tokens (spec 4).

    ``outcome`` goes on token ``response_len - 1``; ``alpha * process[k]`` on token
    ``episode_ends[k] - 1``; contributions landing on the same token add up. An empty response
    has no token to carry a reward and gives an empty tensor.
    """
    if response_len < 0:
        raise ValueError(f"response_len must be >= 0; got {response_len}")
    if len(episode_ends) != len(process):
        raise ValueError(
            f"process must have one reward per episode; got {len(process)} for {len(episode_ends)} episodes"
        )
    ends = [int(e) for e in episode_ends]
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)) or (ends and ends[-1] > response_len):
        raise ValueError(f"episode_ends must be strictly increasing within [1, {response_len}]; got {ends}")
    if not all(math.isfinite(float(r)) for r in [outcome, *process]):
        raise ValueError(f"rewards must be finite; got outcome={outcome!r}, process={list(process)!r}")
    rewards = torch.zeros(response_len, dtype=dtype)
    if response_len == 0:
        return rewards
    for end, r_k in zip(ends, process, strict=True):
        rewards[end - 1] += alpha * float(r_k)
    rewards[response_len - 1] += float(outcome)
    return rewards
