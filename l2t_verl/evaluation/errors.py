"""The one error type the evaluation raises for bad input (docs/method.md §8: one line naming the culprit)."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad input to the evaluation: a missing file, a bad dataset row, an unknown backend, ...

    The message is one line and names the file / row / key at fault, so CLIs print it as is.
    """
