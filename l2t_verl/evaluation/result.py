"""What an evaluation produces: one record per sampled response, and the aggregates over them.

Everything survives a JSON round trip (:meth:`EvalResult.to_dict` / :meth:`EvalResult.from_dict`),
so :func:`l2t_verl.evaluation.report.compare` works on runs loaded back from disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from l2t_verl.evaluation.data import Problem

__all__ = ["ALL", "EvalResult", "SampleRecord", "Trace"]

# Key of the aggregate over every problem (in ``by_tier`` / ``depth``) and group name in the CSVs.
ALL = "all"


@dataclass
class SampleRecord:
    """One sampled response and everything measured on it."""

    dataset: str
    row: int
    sample: int  # 0..n-1
    tier: str
    data_source: str
    ground_truth: Any
    response: str  # decoded with skip_special_tokens, as verl's reward managers do
    num_tokens: int  # response tokens, EOS included
    finish_reason: str  # "stop" or "length"
    reasoning_tokens: int  # tokens before the first </think> (the whole response if none)
    score: float
    answer: str | None  # last \boxed{} content, what maj@k votes on
    verifier_error: str | None = None
    # Budget B -> score of the response under B, and response tokens kept (<= B); see metrics.py.
    budget_scores: dict[int, float] = field(default_factory=dict)
    budget_tokens: dict[int, int] = field(default_factory=dict)
    # Episode depth (depth.py): [{"k", "tokens", "score"}] for k = 0..num_episodes, or None if not probed.
    depth: list[dict[str, Any]] | None = None
    num_episodes: int | None = None

    @property
    def problem_key(self) -> tuple[str, int]:
        return (self.dataset, self.row)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget_scores"] = {str(k): v for k, v in self.budget_scores.items()}
        d["budget_tokens"] = {str(k): v for k, v in self.budget_tokens.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleRecord:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["budget_scores"] = {int(k): float(v) for k, v in (d.get("budget_scores") or {}).items()}
        kw["budget_tokens"] = {int(k): int(v) for k, v in (d.get("budget_tokens") or {}).items()}
        return cls(**kw)


@dataclass
class Trace:
    """A sampled response while the evaluation runs: its record plus the token ids behind it."""

    problem: Problem
    prompt_ids: list[int]
    response_ids: list[int]
    record: SampleRecord


@dataclass
class EvalResult:
    """Result of :func:`l2t_verl.evaluation.evaluate`.

    ``overall`` / ``by_dataset[name]`` / ``by_tier[tier]`` are summaries from
    :func:`l2t_verl.evaluation.metrics.summarize` (``pass@1``, ``maj@4``, token statistics,
    ``budgets``: a list of ``{"budget", "accuracy", "mean_tokens", "forced_rate"}``).
    ``depth[tier]`` (and ``depth["all"]``) is the Acc(k) / T(k) curve from
    :func:`l2t_verl.evaluation.depth.depth_curve`; empty when depth analysis was off.
    """

    name: str
    model: str
    model_dir: str
    config: dict[str, Any]
    overall: dict[str, Any]
    by_dataset: dict[str, dict[str, Any]]
    by_tier: dict[str, dict[str, Any]]
    depth: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    samples: list[SampleRecord] = field(default_factory=list)

    @property
    def pass_at_1(self) -> float:
        return float(self.overall["pass@1"])

    @property
    def maj_at_4(self) -> float | None:
        return self.overall.get("maj@4")

    @property
    def mean_tokens(self) -> float:
        return float(self.overall["mean_tokens"])

    def budget_accuracy(self) -> dict[int, float]:
        """Budget -> accuracy over all problems."""
        return {int(p["budget"]): float(p["accuracy"]) for p in self.overall.get("budgets", [])}

    def to_dict(self, with_samples: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        if with_samples:
            d["samples"] = [s.to_dict() for s in self.samples]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "samples"}
        kw["samples"] = [SampleRecord.from_dict(s) for s in d.get("samples") or []]
        return cls(**kw)
