"""Evaluation problems read from verl-schema dataset files (parquet, JSONL or a JSON list).

A row needs ``prompt`` (a non-empty list of ``{"role", "content"}`` chat messages), ``data_source``
(resolvable by :func:`l2t_verl.scoring.get_verifier`) and ``reward_model.ground_truth``;
``extra_info`` is optional and ``extra_info.tier`` gives the difficulty tier of the depth analysis.
Every row is checked when loading, so a bad one is reported (file, row, key) before any generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2t_verl.dataset import check_row
from l2t_verl.evaluation.errors import EvaluationError

__all__ = ["UNTIERED", "Problem", "load_problems", "split_paths", "to_plain"]

# Tier label of rows without ``extra_info.tier``; "all" is reserved for the aggregate over every row.
UNTIERED = "untiered"


@dataclass(frozen=True)
class Problem:
    """One dataset row, ready to prompt and score."""

    dataset: str  # name of the file it came from (its stem; made unique across files)
    row: int  # row index inside that file
    messages: list[dict[str, str]]
    data_source: str
    ground_truth: Any
    extra_info: dict[str, Any] = field(default_factory=dict)
    tier: str = UNTIERED

    def score(self, text: str) -> tuple[float, str | None]:
        """Verifier score of a response text and the verifier's error, if it raised.

        A raising verifier scores 0 and the error is returned for counting, as in training
        (docs/method.md §8: ``l2t/verifier_errors``), so one odd response cannot abort a long evaluation.
        """
        from l2t_verl.scoring import compute_score

        try:
            return float(compute_score(self.data_source, text, self.ground_truth, self.extra_info)), None
        except Exception as exc:  # verifiers may raise anything (sympy, timeouts, bad gold answers)
            return 0.0, f"{type(exc).__name__}: {exc}"


def to_plain(value: Any) -> Any:
    """Convert numpy scalars/arrays (what parquet readers may hand back) to JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy array or scalar
        return to_plain(value.tolist())
    return value


def split_paths(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Accept one path, a comma-separated string of paths (the CLI form) or a sequence of paths."""
    if isinstance(data, (str, Path)):
        items = [p for p in str(data).split(",") if p.strip()]
    else:
        items = [str(p) for p in data]
    if not items:
        raise EvaluationError("no dataset file given")
    return [Path(p.strip()) for p in items]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise EvaluationError(f"{path}: line {i + 1}: not valid JSON ({exc})") from None
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise EvaluationError(f"{path}: a .json dataset must hold a list of rows")
        else:
            raise EvaluationError(
                f"{path}: unsupported dataset format {suffix!r} (use .parquet, .jsonl, .json)"
            )
    except EvaluationError:
        raise
    except Exception as exc:  # pyarrow / json raise several unrelated types for a bad file
        raise EvaluationError(f"{path}: cannot read dataset ({type(exc).__name__}: {exc})") from None
    return [to_plain(r) for r in rows]


def _problem(path: Path, name: str, i: int, row: Any, prompt_key: str) -> Problem:
    where = f"{path}: row {i}"
    if not isinstance(row, dict):
        raise EvaluationError(f"{where}: expected a mapping, got {type(row).__name__}")
    messages, truth, source = check_row(row, where, prompt_key, error=EvaluationError)
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise EvaluationError(f"{where}: field 'extra_info' must be a mapping, got {type(extra).__name__}")
    tier = extra.get("tier")
    return Problem(
        dataset=name,
        row=i,
        messages=[{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        data_source=source,
        ground_truth=truth,
        extra_info=extra,
        # "all" names the aggregate over every tier, so a tier literally called that is renamed.
        tier=UNTIERED if tier is None else ("tier_all" if str(tier) == "all" else str(tier)),
    )


def load_problems(
    data: str | Path | Sequence[str | Path], limit: int | None = None, prompt_key: str = "prompt"
) -> list[Problem]:
    """Read and check every row of every file; ``limit`` keeps the first rows of each file.

    Raises :class:`EvaluationError` naming the file, row and key of the first bad row.
    """
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be >= 1; got {limit}")
    problems: list[Problem] = []
    names: set[str] = set()
    for path in split_paths(data):
        rows = _read_rows(path)
        if not rows:
            raise EvaluationError(f"{path}: no rows")
        name, k = path.stem, 2
        while name in names:  # two files with the same stem (e.g. */test.parquet) stay apart
            name, k = f"{path.stem}#{k}", k + 1
        names.add(name)
        for i, row in enumerate(rows[:limit] if limit else rows):
            problems.append(_problem(path, name, i, row, prompt_key))
    return problems
