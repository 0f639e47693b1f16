"""Brace matching in LaTeX-style answer text: the ``\\boxed{}`` extractor, the J_r probes' ground-truth
normalisation and forced answering all read braces the same way.

A backslash escapes the character after it, so ``\\{`` and ``\\}`` are literal braces and never
count towards nesting. The module imports nothing from the package, so verifier modules can use it
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["brace_steps", "closing_brace", "open_braces"]


def brace_steps(text: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(index, +1)`` for every unescaped ``{`` and ``(index, -1)`` for every unescaped ``}`` of
    ``text[start:]``, in order."""
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            yield i, 1
        elif ch == "}":
            yield i, -1
        i += 1


def closing_brace(text: str, start: int, depth: int) -> int | None:
    """Index of the ``}`` that closes ``depth`` braces already open at ``start``, or ``None``."""
    for i, step in brace_steps(text, start):
        depth += step
        if step < 0 and depth == 0:
            return i
    return None


def open_braces(text: str) -> int:
    """Braces ``{`` left open at the end of ``text``; a ``}`` with none open is ignored."""
    depth = 0
    for _, step in brace_steps(text):
        depth = max(0, depth + step)
    return depth
