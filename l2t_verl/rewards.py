"""L2T rewards (docs/method.md §§3-4): pure functions, no verl import.

- process reward of episode k:  ``r_k = delta_J_k - beta * p_hat_k``
- penalty scale (section 3):    ``p_hat_k = p_k * mean|delta_J| / mean p`` (``delta_j``, default),
  both means over the batch's rewarded episodes, so that ``beta`` weighs the penalty against
  typical progress; ``p / mean p`` (``batch_mean``) when there is no progress term to scale to;
  ``p`` as is (``none``).
- token placement:              ``r_out`` on the last valid response token, ``alpha * r_k`` on
  episode k's last token, so the per-response sum is eq. 5's ``r_out + alpha * sum_k r_k``.
  The advantage (:mod:`l2t_verl.advantage`) takes the two parts separately; this placement is
  what they add up to, kept for the record and for the dumps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2t_verl.episodes import check_episode_ends

__all__ = [
    "PENALTY_NORMALIZE_MODES",
    "PenaltyScale",
    "dense_token_rewards",
    "normalize_penalties",
    "process_rewards",
]

PENALTY_NORMALIZE_MODES = ("delta_j", "batch_mean", "none")


def process_rewards(delta_j: Sequence[float], penalties_hat: Sequence[float], beta: float) -> list[float]:
    """``r_k = delta_J_k - beta * p_hat_k`` for k = 1..K (section 4)."""
    if len(delta_j) != len(penalties_hat):
        raise ValueError(
            f"delta_j and penalties_hat must have one entry per episode; got {len(delta_j)} and "
            f"{len(penalties_hat)}"
        )
    return [float(d) - beta * float(p) for d, p in zip(delta_j, penalties_hat, strict=True)]


@dataclass(frozen=True)
class PenaltyScale:
    """``p_hat`` [B, K] and what the scaling did: the mode actually used, the episodes clipped, the
    non-finite raw values that were set to 0 (section 8, ``l2t/penalty_nonfinite``)."""

    p_hat: torch.Tensor
    mode: str
    n_clipped: int
    n_nonfinite: int


def normalize_penalties(
    raw: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "delta_j",
    delta_j: torch.Tensor | None = None,
    clip: float = 10.0,
) -> PenaltyScale:
    """Scale the raw episode penalties ``raw`` [B, K] over the rewarded episodes ``mask`` [B, K].

    - ``delta_j``: ``p_hat = p * mean|delta_J| / mean p``, clipped at ``clip * mean|delta_J|``.
      Needs ``delta_j`` [B, K]; without it (the progress term is off) the ``batch_mean`` rule is
      used instead and ``mode`` in the result says so.
    - ``batch_mean``: ``p_hat = p / mean p``, clipped at ``clip`` (= ``clip`` times its mean, 1).
    - ``none``: ``p_hat = p``.

    ``mean p == 0`` (step 1 under ``previous_step``) gives ``p_hat = 0``. There is no absolute
    epsilon anywhere: raw penalties of 1e-12 scale exactly like raw penalties of 1e2. Non-finite
    rewarded entries are set to 0 before the means and counted, so one bad episode cannot poison
    the batch; entries outside ``mask`` are 0 in the output.
    """
    if mode not in PENALTY_NORMALIZE_MODES:
        raise ValueError(
            f"l2t.penalty.normalize must be one of {list(PENALTY_NORMALIZE_MODES)}; got {mode!r}"
        )
    if raw.shape != mask.shape:
        raise ValueError(f"mask must have the shape of raw {tuple(raw.shape)}; got {tuple(mask.shape)}")
    if delta_j is not None and delta_j.shape != raw.shape:
        raise ValueError(f"delta_j must have the shape of raw {tuple(raw.shape)}; got {tuple(delta_j.shape)}")
    if not clip > 0:
        raise ValueError(f"l2t.penalty.clip must be > 0; got {clip!r}")
    valid = mask.bool()
    finite = torch.isfinite(raw)
    n_nonfinite = int((valid & ~finite).sum())
    p = torch.where(valid & finite, raw, torch.zeros_like(raw))
    if mode == "delta_j" and delta_j is None:
        mode = "batch_mean"
    if mode == "none" or not bool(valid.any()):
        return PenaltyScale(p, mode, 0, n_nonfinite)

    # Means in float64: raw penalties at lr 1e-6 are ~1e-12, their sum must not lose digits.
    p64 = p.double()
    mean_p = p64[valid].mean()
    if mean_p <= 0:
        return PenaltyScale(torch.zeros_like(p), mode, 0, n_nonfinite)
    if mode == "delta_j":
        target = delta_j.double().abs()[valid].mean()
        scaled, ceiling = p64 * (target / mean_p), clip * target
    else:
        scaled, ceiling = p64 / mean_p, torch.tensor(float(clip), dtype=torch.float64)
    clipped = valid & (scaled > ceiling)
    p_hat = torch.where(clipped, ceiling, scaled).to(raw.dtype) * valid
    return PenaltyScale(p_hat, mode, int(clipped.sum()), n_nonfinite)


def dense_token_rewards(
    response_len: int,
    episode_ends: Sequence[int],
    outcome: float,
    process: Sequence[float],
    alpha: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token rewards of one response of ``response_len`` valid tokens (section 4).

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
    ends = check_episode_ends(episode_ends, response_len)
    if not all(math.isfinite(float(r)) for r in [outcome, *process]):
        raise ValueError(f"rewards must be finite; got outcome={outcome!r}, process={list(process)!r}")
    rewards = torch.zeros(response_len, dtype=dtype)
    if response_len == 0:
        return rewards
    for end, r_k in zip(ends, process, strict=True):
        rewards[end - 1] += alpha * float(r_k)
    rewards[response_len - 1] += float(outcome)
    return rewards
