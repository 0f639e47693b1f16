"""The driver's L2T step: from the batch's records, raw penalties and outcomes to rewards, advantages and
metrics (docs/method.md §§3-5 and 7). Pure: no verl, no Ray, no I/O; the trainer gathers the
inputs from the batch and writes the advantages back.

1. rewarded episodes: the episodes of every response whose probes did not fail;
2. ``p_hat``: the raw penalties scaled to the size of ``|delta_J|``
   (:func:`l2t_verl.rewards.normalize_penalties`);
3. ``r_k = delta_J_k - beta * p_hat_k`` on the rewarded episodes;
4. the advantage: GRPO on ``r_out`` plus ``alpha`` times the group-normalised ``r_k`` to go
   (:mod:`l2t_verl.advantage`);
5. the ``l2t/`` metrics of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from l2t_verl.advantage import advantage_parts, normalized_process_rewards
from l2t_verl.record import SampleRecord
from l2t_verl.rewards import normalize_penalties
from l2t_verl.settings import L2TConfig

__all__ = ["JrHealth", "StepResult", "l2t_step"]

logger = logging.getLogger(__name__)

_CORRECT = 0.5  # r_out at or above this is a correct response (the verifiers here return 0 or 1)


@dataclass
class StepResult:
    """Everything one step computed, per sample ([B, K] tensors are 0 outside ``episode_mask``)."""

    advantages: torch.Tensor  # [B, T]; also the returns
    episode_mask: torch.Tensor  # [B, K] bool: episode exists and is rewarded
    episode_ends: torch.Tensor  # [B, K] long
    delta_j: torch.Tensor  # [B, K]
    penalty_raw: torch.Tensor  # [B, K], non-finite values set to 0
    penalty_hat: torch.Tensor  # [B, K]
    process_rewards: torch.Tensor  # [B, K] r_k
    normalized_process: torch.Tensor  # [B, K] r~
    metrics: dict[str, float] = field(default_factory=dict)


def _tensors(records: Sequence[SampleRecord], k_max: int, progress: bool) -> tuple[torch.Tensor, ...]:
    n = len(records)
    exists = torch.zeros(n, k_max, dtype=torch.bool)
    ends = torch.zeros(n, k_max, dtype=torch.long)
    delta_j = torch.zeros(n, k_max)
    for i, r in enumerate(records):
        k = min(r.num_episodes, k_max)
        exists[i, :k] = True
        ends[i, :k] = torch.tensor(r.episode_ends[:k], dtype=torch.long)
        if progress and r.delta_j:
            delta_j[i, :k] = torch.tensor(r.delta_j[:k])
    failed = torch.tensor([progress and r.probe_failed for r in records], dtype=torch.bool)
    return exists, exists & ~failed[:, None], ends, delta_j


def l2t_step(
    records: Sequence[SampleRecord],
    outcomes: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    cfg: L2TConfig,
    raw_penalties: torch.Tensor | None = None,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> StepResult:
    """One step's L2T math.

    Args:
        records: one checked :class:`SampleRecord` per response (``l2t_verl.record.read_records``).
        outcomes: ``[B]`` ``r_out``.
        response_mask: ``[B, T]`` valid response tokens.
        index: ``[B]`` prompt group ids (verl's ``uid``).
        cfg: the ``l2t`` settings (alpha, beta, the penalty's scaling, the switches).
        raw_penalties: ``[B, >= K]`` raw penalties ``p_k`` from the actor; None when the penalty is off.
        norm_adv_by_std_in_grpo / epsilon: as verl's ``algorithm`` settings.
    """
    k_max = cfg.episodes.max_episodes
    progress = cfg.progress_active
    exists, rewarded, ends, delta_j = _tensors(records, k_max, progress)
    n = len(records)
    if raw_penalties is not None and cfg.penalty_active:
        raw = raw_penalties.float()[:, :k_max]
        scale = normalize_penalties(
            raw,
            rewarded,
            cfg.penalty.normalize,
            delta_j=delta_j if progress else None,
            clip=cfg.penalty.clip,
        )
        raw = torch.where(torch.isfinite(raw) & rewarded, raw, torch.zeros_like(raw))
        p_hat, clipped, nonfinite = scale.p_hat, scale.n_clipped, scale.n_nonfinite
    else:
        raw = p_hat = torch.zeros(n, k_max)
        clipped = nonfinite = 0
    process = torch.where(rewarded, delta_j - cfg.beta * p_hat, torch.zeros_like(delta_j))

    r_tilde = normalized_process_rewards(process, rewarded, index, norm_adv_by_std_in_grpo, epsilon)
    outcome_part, process_part = advantage_parts(
        outcomes.float(),
        r_tilde,
        rewarded,
        ends,
        response_mask,
        index,
        cfg.alpha,
        norm_adv_by_std_in_grpo,
        epsilon,
    )
    result = StepResult(
        advantages=outcome_part + process_part,
        episode_mask=rewarded,
        episode_ends=ends,
        delta_j=delta_j * rewarded,
        penalty_raw=raw,
        penalty_hat=p_hat,
        process_rewards=process,
        normalized_process=r_tilde,
    )
    valid = response_mask.bool()
    result.metrics = _metrics(records, outcomes, valid, exists, rewarded, result, outcome_part, process_part)
    result.metrics["l2t/penalty_clipped"] = float(clipped)
    result.metrics["l2t/penalty_nonfinite"] = float(nonfinite)
    return result


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _metrics(
    records, outcomes, valid, exists, rewarded, result, outcome_part, process_part
) -> dict[str, float]:
    """Section 7: what every step reports under ``l2t/``."""
    k = exists.sum(dim=-1).float()
    probed = [(r.jr, float(o)) for r, o in zip(records, outcomes.tolist(), strict=True) if r.jr]
    held = rewarded.sum().clamp(min=1)

    def over_rewarded(values: torch.Tensor) -> float:
        return float((values * rewarded).sum() / held)

    metrics = {
        "l2t/episodes_per_response/mean": float(k.mean()) if len(k) else 0.0,
        "l2t/episodes_per_response/max": float(k.max()) if len(k) else 0.0,
        "l2t/jr_first": _mean([jr[0] for jr, _ in probed]),
        "l2t/jr_last": _mean([jr[-1] for jr, _ in probed]),
        "l2t/delta_jr_mean": over_rewarded(result.delta_j),
        "l2t/delta_jr_abs_mean": over_rewarded(result.delta_j.abs()),
        "l2t/penalty_raw_mean": over_rewarded(result.penalty_raw),
        "l2t/penalty_mean": over_rewarded(result.penalty_hat),
        "l2t/process_reward_mean": over_rewarded(result.process_rewards),
        "l2t/rewarded_episodes": float(rewarded.sum()),
        "l2t/adv_outcome_std": float(outcome_part[valid].std()) if int(valid.sum()) > 1 else 0.0,
        "l2t/adv_process_std": float(process_part[valid].std()) if int(valid.sum()) > 1 else 0.0,
        "l2t/outcome_acc": float(outcomes.float().mean()) if len(outcomes) else 0.0,
        "l2t/response_tokens_mean": float(valid.sum(dim=-1).float().mean()) if len(valid) else 0.0,
        "l2t/probe_tokens_per_response": _mean([r.probe_tokens for r in records]),
        "l2t/probe_time_s": float(sum(r.probe_time_s for r in records)),
        "l2t/probe_failures": float(sum(r.probe_failed for r in records)),
        # The denominator of probe_failures, summed over a run by l2t_verl.summary.
        "l2t/responses": float(len(records)),
        "l2t/probe_cache_fallbacks": float(sum(r.probe_cache_fallbacks for r in records)),
        "l2t/verifier_errors": float(
            sum(r.probe_verifier_errors + int(r.outcome_verifier_error) for r in records)
        ),
    }
    # J_r after the last episode on correct vs wrong responses: if it is not higher on the correct
    # ones, the probes measure nothing. Absent when a class is empty (no value to average).
    correct = [jr[-1] for jr, o in probed if o >= _CORRECT]
    wrong = [jr[-1] for jr, o in probed if o < _CORRECT]
    if correct:
        metrics["l2t/jr_last_correct"] = _mean(correct)
    if wrong:
        metrics["l2t/jr_last_wrong"] = _mean(wrong)
    return metrics


class JrHealth:
    """Warns loudly when ``jr_last_correct - jr_last_wrong`` stays <= 0 for ``patience`` consecutive steps
    that have both classes: the J_r probes then do not tell right from wrong (force suffix, answer
    scoring or tokenization is off)."""

    def __init__(self, patience: int = 5) -> None:
        self.patience = patience
        self.bad_steps = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record one step's metrics; True (and a warning) when the gap has stayed <= 0 long enough."""
        if "l2t/jr_last_correct" not in metrics or "l2t/jr_last_wrong" not in metrics:
            return False
        gap = metrics["l2t/jr_last_correct"] - metrics["l2t/jr_last_wrong"]
        self.bad_steps = self.bad_steps + 1 if gap <= 0 else 0
        if self.bad_steps >= self.patience:
            logger.warning(
                "l2t: J_r HEALTH CHECK FAILED: J_r after the last episode has not been higher on correct "
                "than on wrong responses for %d steps (gap %.4f). The probes measure nothing: check "
                "l2t.progress.force_suffix / answer_suffix against how the model writes its answer.",
                self.bad_steps,
                gap,
            )
            return True
        return False
