"""Accuracy and token metrics over sampled responses.

Definitions (n samples per problem, default 20 as in the paper's Table 1):

- ``pass@1``: mean over problems of the mean verifier score of its n samples (the unbiased pass@1
  estimator; with 0/1 scores it is the fraction of correct samples, averaged per problem so every
  problem weighs the same).
- ``maj@k`` (k = 4): the n samples of a problem are split into ``n // k`` disjoint groups of k
  consecutive samples (0..3, 4..7, ...; leftovers are unused). In each group the samples vote with
  their normalized final answer (last ``\\boxed{}``; samples without one do not vote); the most voted
  answer wins, ties going to the answer that appears first in the group. The group scores what the
  verifier gave the first sample carrying the winning answer (0 when nobody voted). maj@k is the mean
  over groups, then over problems; ``None`` when n < k.
- Token statistics are over response tokens (EOS included) of every sample: mean, percentiles, max,
  and the mean over correct samples (score >= 0.5).

Accuracy under a token budget B (paper Fig. 3, "truncate these trajectories at different token
budgets"), for every sample:

- it ended by itself (EOS) within B tokens: it keeps its own score and length;
- otherwise its reasoning is cut at ``min(B, reasoning_end)`` tokens, where ``reasoning_end`` is the
  token index of the first ``</think>`` (the whole response if it never closed its reasoning), and
  the model is forced to answer greedily after the force suffix (:mod:`l2t_verl.evaluation.forcing`).
  The kept prefix (<= B tokens) is what counts as spent; the forced answer (<= ``answer_tokens``)
  is not counted, as in budget forcing.

Accuracy(B) is then the pass@1 of these scores. A response that hit ``max_tokens`` without EOS is
always forced, so budgets above ``max_tokens`` would say nothing new and are rejected.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.evaluation.forcing import ForcedAnswerer
from l2t_verl.evaluation.result import SampleRecord, Trace

__all__ = [
    "CORRECT_THRESHOLD",
    "budget_cut",
    "check_budgets",
    "group_by_problem",
    "maj_at_k",
    "majority_score",
    "normalize_answer",
    "pass_at_1",
    "run_budgets",
    "summarize",
    "token_stats",
]

CORRECT_THRESHOLD = 0.5
PERCENTILES = (50, 90, 95)


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for voting: no whitespace, ``$``, ``\\left``/``\\right``, ``\\!``/``\\,``
    spacing or a trailing period; ``None`` for a missing or empty answer."""
    if answer is None:
        return None
    s = re.sub(r"\\left|\\right|\\[!,;: ]", "", answer)
    s = re.sub(r"\s+", "", s).strip("$").rstrip(".")
    return s or None


def pass_at_1(scores: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean score of their samples."""
    per_problem = [sum(s) / len(s) for s in scores if len(s)]
    if not per_problem:
        raise ValueError("pass@1 needs at least one problem with samples")
    return sum(per_problem) / len(per_problem)


def majority_score(answers: Sequence[str | None], scores: Sequence[float]) -> float:
    """Score of one majority vote (see the module docstring)."""
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = normalize_answer(a)
        if key is None:
            continue
        votes[key] = votes.get(key, 0) + 1
        first.setdefault(key, i)
    if not votes:
        return 0.0
    winner = max(votes, key=lambda a: (votes[a], -first[a]))
    return float(scores[first[winner]])


def maj_at_k(
    answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]], k: int = 4
) -> float | None:
    """maj@k over problems (module docstring); ``None`` when some problem has fewer than k samples."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    per_problem = []
    for a, s in zip(answers, scores, strict=True):
        if len(a) != len(s):
            raise ValueError(f"answers and scores differ in length: {len(a)} vs {len(s)}")
        groups = len(a) // k
        if groups == 0:
            return None
        per_problem.append(
            sum(majority_score(a[g * k : (g + 1) * k], s[g * k : (g + 1) * k]) for g in range(groups))
            / groups
        )
    return sum(per_problem) / len(per_problem) if per_problem else None


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), without needing numpy here.
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def token_stats(lengths: Iterable[int], percentiles: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """``mean_tokens``, ``p50_tokens``/``p90_tokens``/..., ``max_tokens`` of response lengths."""
    values = sorted(int(x) for x in lengths)
    if not values:
        return {}
    out = {"mean_tokens": statistics.fmean(values)}
    for q in percentiles:
        out[f"p{q}_tokens"] = _percentile(values, q)
    out["max_tokens"] = float(values[-1])
    return out


def budget_cut(num_tokens: int, finish_reason: str, reasoning_tokens: int, budget: int) -> int | None:
    """Where a response is cut under ``budget``; ``None`` when it is kept whole (module docstring)."""
    if finish_reason == "stop" and num_tokens <= budget:
        return None
    return min(budget, reasoning_tokens)


def group_by_problem(records: Iterable[SampleRecord]) -> list[list[SampleRecord]]:
    """Records grouped per problem (first-seen order), each group ordered by sample index."""
    groups: dict[tuple[str, int], list[SampleRecord]] = {}
    for r in records:
        groups.setdefault(r.problem_key, []).append(r)
    return [sorted(g, key=lambda r: r.sample) for g in groups.values()]


def summarize(records: Sequence[SampleRecord], maj_k: int = 4) -> dict[str, Any]:
    """All metrics of the module docstring over ``records`` (any subset: a dataset, a tier, ...)."""
    problems = group_by_problem(records)
    if not problems:
        return {"problems": 0, "samples": 0}
    scores = [[r.score for r in g] for g in problems]
    answers = [[r.answer for r in g] for g in problems]
    correct = [r.num_tokens for r in records if r.score >= CORRECT_THRESHOLD]
    out: dict[str, Any] = {
        "problems": len(problems),
        "samples": len(records),
        "pass@1": pass_at_1(scores),
        f"maj@{maj_k}": maj_at_k(answers, scores, maj_k),
    }
    out.update(token_stats(r.num_tokens for r in records))
    out["mean_tokens_correct"] = statistics.fmean(correct) if correct else None
    out["truncated_rate"] = sum(r.finish_reason == "length" for r in records) / len(records)
    out["verifier_errors"] = sum(r.verifier_error is not None for r in records)
    budgets = sorted(set().union(*(r.budget_scores.keys() for r in records)))
    out["budgets"] = []
    for b in budgets:
        have = [g for g in problems if all(b in r.budget_scores for r in g)]
        flat = [r for g in have for r in g]
        out["budgets"].append(
            {
                "budget": b,
                "accuracy": pass_at_1([[r.budget_scores[b] for r in g] for g in have]),
                "mean_tokens": statistics.fmean(r.budget_tokens[b] for r in flat),
                "forced_rate": sum(
                    budget_cut(r.num_tokens, r.finish_reason, r.reasoning_tokens, b) is not None for r in flat
                )
                / len(flat),
            }
        )
    return out


def check_budgets(budgets: Iterable[int], max_tokens: int) -> list[int]:
    """Sorted, de-duplicated budgets; ``EvaluationError`` for one that is not in [1, max_tokens]."""
    out = set()
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise EvaluationError(f"budgets: each budget must be an integer >= 1; got {b!r}")
        if b > max_tokens:
            raise EvaluationError(
                f"budgets: budget {b} exceeds max_tokens={max_tokens}; responses are not sampled that far"
            )
        out.add(b)
    return sorted(out)


def run_budgets(traces: Sequence[Trace], budgets: Sequence[int], answerer: ForcedAnswerer) -> None:
    """Fill ``budget_scores`` / ``budget_tokens`` of every trace's record (module docstring)."""
    jobs: list[tuple[Trace, int, int]] = []
    for t in traces:
        r = t.record
        for b in budgets:
            cut = budget_cut(r.num_tokens, r.finish_reason, r.reasoning_tokens, b)
            if cut is None:
                r.budget_scores[b] = r.score
                r.budget_tokens[b] = r.num_tokens
            else:
                jobs.append((t, b, cut))
    forced = answerer.answer(
        [(t.prompt_ids, t.response_ids[:cut]) for t, _, cut in jobs], desc="budget forced answers"
    )
    for (t, b, cut), fa in zip(jobs, forced, strict=True):
        t.record.budget_scores[b] = 0.0 if fa.overflow else t.problem.score(fa.text)[0]
        t.record.budget_tokens[b] = cut
    for t in traces:  # kept and forced budgets were filled in two passes: restore budget order
        t.record.budget_scores = dict(sorted(t.record.budget_scores.items()))
        t.record.budget_tokens = dict(sorted(t.record.budget_tokens.items()))
