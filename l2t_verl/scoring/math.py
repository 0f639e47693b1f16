"""Competition-math verifier (AIME, MATH-500, AMC, Minerva, ...) built on math-verify.

Only the content of the last ``\\boxed{}`` is compared, so stray numbers in the reasoning cannot
match the gold answer by accident.

Timeouts: math-verify guards ``parse``/``verify`` with ``signal.alarm``, which raises when
called outside the main thread (verl reward workers, thread pools, some Ray actor setups).  We
therefore only enable its timeouts on the main thread and pass ``None`` elsewhere; there, the
length cap below is what keeps a pathological expression from stalling sympy.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from l2t_verl.scoring.arith import extract_boxed

logger = logging.getLogger(__name__)

# Seconds for math-verify's signal-based timeouts (main thread only).
TIMEOUT_SECONDS = 5
# Boxed answers longer than this are scored 0 without parsing: real answers are short, and
# sympy can take minutes on adversarially long expressions when no timeout is available.
MAX_ANSWER_CHARS = 512


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _gold_text(ground_truth: Any) -> str:
    gt = str(ground_truth).strip()
    # Gold answers come either bare ("\\frac{1}{2}", "0.5") or already boxed/delimited.
    if "\\boxed" in gt or gt.startswith("$"):
        return gt
    return f"\\boxed{{{gt}}}"


def is_equivalent(pred: str, gold: str) -> bool:
    """math-verify equivalence of a predicted answer string and a gold answer string (both bare,
    e.g. ``"0.5"`` and ``"\\frac{1}{2}"``).  Any internal error counts as not equivalent."""
    from math_verify import parse, verify

    timeout = _timeout()
    try:
        gold_parsed = parse(_gold_text(gold), parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy raise a zoo of exceptions on odd input
        logger.debug("math-verify failed on pred=%r gold=%r", pred, gold, exc_info=True)
        return False


def score(solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any) -> float:
    """1.0 iff the last boxed answer is math-equivalent to (any of) ``ground_truth``."""
    pred = extract_boxed(solution_str)
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    golds = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    return 1.0 if any(is_equivalent(pred, g) for g in golds) else 0.0
