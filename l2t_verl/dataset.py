"""Start-up validation of verl parquet datasets (docs/method.md §8): a bad row is named before any
worker starts.

verl's ``RLHFDataset`` reads ``prompt`` (chat messages), ``data_source`` and ``reward_model.ground_truth``.
A row without a usable ground truth would silently score 0 forever, and a ``data_source`` without a
verifier would fail in the middle of a run; both are rejected here with the file, row and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names file, row and field."""


class RowFields(NamedTuple):
    """What training and evaluation read from a checked row."""

    messages: list[dict[str, Any]]
    ground_truth: Any
    data_source: str


def _usable(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if hasattr(value, "__len__"):  # numpy arrays too: parquet readers may hand them back
        return len(value) > 0
    return True


def check_row(
    row: Mapping[str, Any] | pd.Series,
    where: str,
    prompt_key: str = "prompt",
    check_verifier: bool = True,
    error: type[Exception] = DatasetError,
) -> RowFields:
    """The fields of one verl dataset row, or ``error(f"{where}: field ...: what is wrong")``.

    The checks: ``prompt_key`` a non-empty list of ``{"role", "content"}`` messages, a non-empty
    ``reward_model.ground_truth``, a non-empty ``data_source`` and (``check_verifier``) one that
    :func:`l2t_verl.scoring.get_verifier` resolves. ``where`` names the file and row; ``error`` is the
    caller's exception type, so training start-up and evaluation report a bad row in the same words.
    """
    prompt = row.get(prompt_key)
    messages = list(prompt) if hasattr(prompt, "__len__") and not isinstance(prompt, str) else None
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise error(f"{where}: field {prompt_key!r} must be a non-empty list of chat messages")
    reward_model = row.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if not _usable(truth):
        raise error(f"{where}: field 'reward_model.ground_truth' is missing or empty")
    source = row.get("data_source")
    if not isinstance(source, str) or not source:
        raise error(f"{where}: field 'data_source' is missing or empty")
    if check_verifier:
        from l2t_verl.scoring import get_verifier

        try:
            get_verifier(source)
        except ValueError as exc:
            raise error(f"{where}: field 'data_source': {exc}") from None
    return RowFields(messages, truth, source)


def validate_dataset(path: str | Path, prompt_key: str = "prompt", check_verifier: bool = True) -> int:
    """Check every row of a verl parquet file; return the number of rows.

    Raises :class:`DatasetError` at the first bad row: a missing file or column, a prompt that is not a
    non-empty list of ``{"role", "content"}`` messages, a missing/empty ``reward_model.ground_truth``, or
    (``check_verifier``) a ``data_source`` that :func:`l2t_verl.scoring.compute_score` cannot score.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
    for column in (prompt_key, "data_source", "reward_model"):
        if column not in frame.columns:
            raise DatasetError(f"{path}: missing column {column!r} (has {list(frame.columns)})")
    if len(frame) == 0:
        raise DatasetError(f"{path}: no rows")

    for i, row in frame.iterrows():
        check_row(row, f"{path}: row {i}", prompt_key, check_verifier)
    return len(frame)
