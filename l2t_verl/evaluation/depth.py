"""Episode-depth analysis (paper Fig. 1 / Fig. 6): how accuracy and tokens evolve with reasoning depth.

For each probed response (the first ``samples_per_problem`` samples of every problem), the episode
boundaries ``e_1 < ... < e_K`` come from :func:`l2t_verl.episodes.segment_episodes` (docs/method.md §1), and
for every depth ``k = 0..K`` the reasoning is cut at ``e_k`` (``e_0 = 0``: no reasoning at all), the
force suffix is appended and a greedy answer is generated and scored
(:mod:`l2t_verl.evaluation.forcing`). The paper stops at the k-th ``</think>`` and appends "Please
output the final answer directly based on the above steps"; the default force suffix is that text.

Curves (per difficulty tier and over all problems):

- ``acc``: Acc(k), the mean forced-answer score at depth k over ALL probed responses. A response with
  K < k episodes had already finished its reasoning, so it contributes its depth-K value: the
  population is the same at every k, and Acc(k) flattens once every response has ended.
- ``tokens``: T(k), mean response tokens before the cut (prompt excluded), with the same carry-over.
- ``acc_reached`` / ``n_reached``: the mean over only the responses that have at least k episodes,
  and how many those are (``acc_reached`` is ``None`` when there are none).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from l2t_verl.episodes import EpisodeConfig, segment_episodes
from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.evaluation.forcing import ForcedAnswerer
from l2t_verl.evaluation.result import ALL, SampleRecord, Trace

__all__ = ["check_depth_settings", "depth_by_tier", "depth_curve", "episode_cuts", "run_depth"]


def episode_cuts(response_ids: Sequence[int], tokenizer: Any, episodes: EpisodeConfig) -> list[int]:
    """Cut points ``[0, e_1, ..., e_K]``: depth k keeps ``response[:cuts[k]]``."""
    return [0, *segment_episodes(response_ids, tokenizer, episodes)]


def check_depth_settings(episodes: EpisodeConfig | None, samples_per_problem: int | None) -> EpisodeConfig:
    """``episodes`` (default :class:`EpisodeConfig`) once it and ``samples_per_problem`` (``None``: all)
    are valid, else :class:`EvaluationError`."""
    episodes = episodes or EpisodeConfig()
    try:
        episodes.validate()
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    if samples_per_problem is not None and (isinstance(samples_per_problem, bool) or samples_per_problem < 1):
        raise EvaluationError(f"depth_samples must be an integer >= 1; got {samples_per_problem!r}")
    return episodes


def run_depth(
    traces: Sequence[Trace],
    answerer: ForcedAnswerer,
    episodes: EpisodeConfig | None = None,
    samples_per_problem: int | None = None,
) -> None:
    """Fill ``depth`` and ``num_episodes`` of the probed traces' records (module docstring)."""
    episodes = check_depth_settings(episodes, samples_per_problem)
    tok = answerer.backend.tokenizer
    jobs: list[tuple[Trace, int, int]] = []
    for t in traces:
        if samples_per_problem is not None and t.record.sample >= samples_per_problem:
            continue
        cuts = episode_cuts(t.response_ids, tok, episodes)
        t.record.num_episodes = len(cuts) - 1
        t.record.depth = []
        jobs.extend((t, k, cut) for k, cut in enumerate(cuts))
    forced = answerer.answer(
        [(t.prompt_ids, t.response_ids[:cut]) for t, _, cut in jobs], desc="depth probes"
    )
    for (t, k, cut), fa in zip(jobs, forced, strict=True):
        score = 0.0 if fa.overflow else t.problem.score(fa.text)[0]
        assert t.record.depth is not None
        t.record.depth.append({"k": k, "tokens": cut, "score": score})


def depth_curve(records: Sequence[SampleRecord]) -> list[dict[str, Any]]:
    """Acc(k), T(k), acc_reached(k), n_reached(k) for k = 0..max K over the probed records."""
    probed = [r for r in records if r.depth]
    if not probed:
        return []
    max_k = max(len(r.depth) - 1 for r in probed)  # type: ignore[arg-type]
    curve = []
    for k in range(max_k + 1):
        at_k = [r.depth[min(k, len(r.depth) - 1)] for r in probed]  # type: ignore[index,arg-type]
        reached = [r.depth[k]["score"] for r in probed if len(r.depth) > k]  # type: ignore[arg-type,index]
        curve.append(
            {
                "k": k,
                "acc": statistics.fmean(e["score"] for e in at_k),
                "tokens": statistics.fmean(e["tokens"] for e in at_k),
                "acc_reached": statistics.fmean(reached) if reached else None,
                "n_reached": len(reached),
                "n": len(probed),
            }
        )
    return curve


def _tier_order(tier: str) -> tuple[int, float, str]:
    try:
        return (0, float(tier), tier)
    except ValueError:
        return (1, 0.0, tier)


def depth_by_tier(records: Sequence[SampleRecord]) -> dict[str, list[dict[str, Any]]]:
    """:func:`depth_curve` per tier (numeric tiers in order) plus ``"all"``; empty if nothing was probed."""
    if not any(r.depth for r in records):
        return {}
    tiers = sorted({r.tier for r in records if r.depth}, key=_tier_order)
    out = {tier: depth_curve([r for r in records if r.tier == tier]) for tier in tiers}
    out[ALL] = depth_curve(records)
    return out
