"""Exact-integer verifier for the synthetic ``l2t_arith`` data, plus the shared ``\\boxed{}``
extractor (it lives here, not in ``__init__``, so that verifier modules can import it without an
import cycle through the package)."""

from __future__ import annotations

import re
from typing import Any

from l2t_verl.scoring.text import closing_brace

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INT_RE = re.compile(r"[+-]?\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Returns ``None`` when there is no box, or when the last box is never closed (e.g. a response
    truncated at the length limit).  We deliberately do not fall back to an earlier box: a
    response whose final answer is malformed should not be rewarded for an intermediate one.
    Escaped braces (``\\{``, ``\\}``) do not count towards nesting.
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    end = closing_brace(text, start, 1)
    return None if end is None else text[start:end]


def parse_int(text: str | None) -> int | None:
    """Parse a boxed answer as an integer; tolerates whitespace and ``$`` but nothing else, so
    e.g. ``3.5`` or ``x = 3`` are wrong answers rather than silently coerced."""
    if text is None:
        return None
    s = text.strip().strip("$").strip()
    if not _INT_RE.fullmatch(s):
        return None
    return int(s)


def score(solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any) -> float:
    """1.0 iff the last boxed answer equals ``int(ground_truth)``, else 0.0.

    A malformed ``ground_truth`` raises ``ValueError``: that is a data bug, not a wrong answer,
    and the caller counts verifier errors separately.
    """
    try:
        gold = int(str(ground_truth).strip())
    except ValueError as e:
        raise ValueError(f"l2t_arith ground_truth is not an integer: {ground_truth!r}") from e
    pred = parse_int(extract_boxed(solution_str))
    return 1.0 if pred is not None and pred == gold else 0.0
