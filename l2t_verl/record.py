"""The per-sample L2T record: what the rollout side and the reward loop hand the driver for one response.

The ``l2t`` agent loop writes it into ``AgentLoopOutput.extra_fields`` (:meth:`SampleRecord.to_extra_fields`);
the ``l2t`` reward manager adds the outcome to ``reward_extra_info`` (:func:`outcome_extra_info`); verl
carries both to the driver as one ``extra_fields`` dict per sample, where the trainer reads them back with
:func:`read_records`. This module owns every field name of that hand-off and its validation, so the
three sides cannot drift apart. It imports neither verl nor the actor side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from l2t_verl.episodes import check_episode_ends

__all__ = [
    "OUTCOME_KEY",
    "REWARD_INFO_KEY",
    "VERIFIER_ERROR_KEY",
    "RecordError",
    "SampleRecord",
    "outcome_extra_info",
    "read_records",
]

logger = logging.getLogger(__name__)

REWARD_INFO_KEY = "reward_extra_info"  # where verl puts a reward manager's per-sample extra info
OUTCOME_KEY = "l2t_outcome"  # r_out, as the outcome verifier scored it
VERIFIER_ERROR_KEY = "l2t_verifier_error"  # 1 when the outcome verifier raised or timed out

_PREFIX = "l2t_"


class RecordError(ValueError):
    """A record that cannot be used; the message names the field."""


def outcome_extra_info(outcome: float, verifier_error: bool) -> dict[str, float | int]:
    """The reward manager's ``reward_extra_info``: a fixed key set of scalars (verl stacks it column-wise
    and indexes every sample by the first one's keys). ``acc`` is verl's usual accuracy column."""
    return {"acc": float(outcome), OUTCOME_KEY: float(outcome), VERIFIER_ERROR_KEY: int(bool(verifier_error))}


def _floats(name: str, value: Any) -> tuple[float, ...]:
    values = tuple(float(v) for v in _as_list(value))
    if not all(math.isfinite(v) for v in values):
        raise RecordError(f"{_PREFIX}{name} holds a non-finite value: {list(values)}")
    return values


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):  # numpy arrays after a trip through TransferQueue / parquet
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"expected a sequence, got {type(value).__name__}")
    return list(value)


@dataclass(frozen=True)
class SampleRecord:
    """One response's episodes and J_r probes.

    episode_ends: exclusive END token index of each of the K episodes.
    jr: K + 1 values (before episode 1 .. after episode K), or () when K = 0, the progress term is
        off, or the probes failed.
    delta_j: K values ``jr[k] - jr[k-1]``, or () as for ``jr``.
    probe_failed / probe_error: a probe failed, or the record was unusable: outcome reward only.
    probe_tokens / probe_time_s: the probes' cost for this response.
    probe_verifier_errors: verifier errors inside sampling probes (each scored incorrect).
    probe_cache_fallbacks: likelihood probes scored again without the prefix cache
        (``l2t.progress.prefix_cache``).
    outcome / outcome_verifier_error: ``r_out`` from the ``l2t`` reward manager (None with another one).
    """

    episode_ends: tuple[int, ...] = ()
    jr: tuple[float, ...] = ()
    delta_j: tuple[float, ...] = ()
    probe_failed: bool = False
    probe_error: str | None = None
    probe_tokens: int = 0
    probe_time_s: float = 0.0
    probe_verifier_errors: int = 0
    probe_cache_fallbacks: int = 0
    outcome: float | None = None
    outcome_verifier_error: bool = False

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def to_extra_fields(self) -> dict[str, Any]:
        """The agent loop's part, as ``extra_fields`` entries (plain Python values)."""
        return {
            f"{_PREFIX}episode_ends": list(self.episode_ends),
            f"{_PREFIX}jr": list(self.jr),
            f"{_PREFIX}delta_j": list(self.delta_j),
            f"{_PREFIX}probe_failed": bool(self.probe_failed),
            f"{_PREFIX}probe_error": self.probe_error,
            f"{_PREFIX}probe_tokens": int(self.probe_tokens),
            f"{_PREFIX}probe_time_s": float(self.probe_time_s),
            f"{_PREFIX}probe_verifier_errors": int(self.probe_verifier_errors),
            f"{_PREFIX}probe_cache_fallbacks": int(self.probe_cache_fallbacks),
        }

    @classmethod
    def from_extra_fields(cls, extra: Mapping[str, Any] | None) -> SampleRecord:
        """Parse one sample's ``extra_fields``; ``RecordError`` naming the field when it is malformed.
        A sample without any ``l2t_*`` field (another agent loop) is an empty record: no episode."""
        extra = dict(extra or {})
        info = extra.get(REWARD_INFO_KEY)
        info = dict(info) if isinstance(info, Mapping) else {}
        try:
            ends = tuple(int(e) for e in _as_list(extra.get(f"{_PREFIX}episode_ends")))
            outcome = info.get(OUTCOME_KEY)
            error = extra.get(f"{_PREFIX}probe_error")
            return cls(
                episode_ends=ends,
                jr=_floats("jr", extra.get(f"{_PREFIX}jr")),
                delta_j=_floats("delta_j", extra.get(f"{_PREFIX}delta_j")),
                probe_failed=bool(extra.get(f"{_PREFIX}probe_failed") or False),
                probe_error=None if error is None else str(error),
                probe_tokens=int(extra.get(f"{_PREFIX}probe_tokens") or 0),
                probe_time_s=float(extra.get(f"{_PREFIX}probe_time_s") or 0.0),
                probe_verifier_errors=int(extra.get(f"{_PREFIX}probe_verifier_errors") or 0),
                probe_cache_fallbacks=int(extra.get(f"{_PREFIX}probe_cache_fallbacks") or 0),
                outcome=None if outcome is None else float(outcome),
                outcome_verifier_error=bool(info.get(VERIFIER_ERROR_KEY) or False),
            )
        except RecordError:
            raise
        except (TypeError, ValueError) as exc:
            raise RecordError(f"malformed l2t fields ({type(exc).__name__}: {exc})") from None

    def check(self, response_len: int, progress: bool) -> None:
        """``RecordError`` unless the record fits a response of ``response_len`` valid tokens: ends strictly
        increasing within it and, with the progress term on and the probes not failed, one ``delta_J``
        per episode and one more ``J_r``."""
        try:
            check_episode_ends(self.episode_ends, response_len)
        except ValueError as exc:
            raise RecordError(f"{_PREFIX}{exc}") from None
        if progress and not self.probe_failed and self.episode_ends:
            k = self.num_episodes
            if len(self.delta_j) != k or len(self.jr) != k + 1:
                raise RecordError(
                    f"{_PREFIX}delta_j / {_PREFIX}jr must hold {k} / {k + 1} values for {k} episodes; "
                    f"got {len(self.delta_j)} / {len(self.jr)}"
                )


def read_records(
    extras: Sequence[Mapping[str, Any] | None],
    response_lengths: Sequence[int],
    progress: bool,
    max_episodes: int | None = None,
) -> tuple[list[SampleRecord], int]:
    """Parse and check every sample's record. An unusable one becomes a record with no episode and the
    reason in ``probe_error`` (outcome reward only, no penalty): counted, logged, never a lost step.

    Returns ``(records, n_malformed)``.
    """
    records: list[SampleRecord] = []
    malformed = 0
    for i, (extra, length) in enumerate(zip(extras, response_lengths, strict=True)):
        outcome, outcome_error = None, False
        try:
            record = SampleRecord.from_extra_fields(extra)
            outcome, outcome_error = record.outcome, record.outcome_verifier_error
            record.check(int(length), progress)
            if max_episodes is not None and record.num_episodes > max_episodes:
                raise RecordError(
                    f"{_PREFIX}episode_ends holds {record.num_episodes} episodes, more than "
                    f"l2t.episodes.max_episodes={max_episodes}"
                )
        except RecordError as exc:
            malformed += 1
            logger.warning("l2t: sample %d of the batch: %s; outcome reward only", i, exc)
            record = SampleRecord(
                probe_failed=True,
                probe_error=f"malformed record: {exc}",
                outcome=outcome,
                outcome_verifier_error=outcome_error,
            )
        records.append(record)
    return records, malformed
