"""Where a response of the synthetic arithmetic task spends its tokens: necessary steps, redundant
episodes, or anything else.

The warm start (:mod:`l2t_verl.warm_start`) teaches traces whose think block is a ``"\\n\\n"``-separated
list of episodes: bare step equations (``"12 * 3 = 36"``) and redundant ones that only restate known
facts (``"Check: <earlier step>"``, ``"So far we have N."``, ``"Let me re-read the question."``). An
episode is classified from its text:

- ``step``: a bare equation (:func:`l2t_verl.warm_start.is_necessary_step`);
- ``redundant``: one of the redundant formats. A bare equation that repeats an earlier one is still a
  ``step``: a problem can legitimately need the same equation twice (``2 * 2 = 4``, ``4 - 2 = 2``,
  ``2 * 2 = 4``), and the trace format cannot tell the two apart;
- ``other``: anything else (garbled text the tiny model sometimes writes).

Episodes are cut with the trainer's own segmentation (:func:`l2t_verl.episodes.segment_episodes`,
delimiter mode, ``"\\n\\n"``), so "tokens in redundant episodes" counts exactly the tokens that L2T's
process reward sees as those episodes (each episode owns its trailing separator). Token counts come
from the sampled ids; text is decoded only to classify, never re-tokenized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from l2t_verl.episodes import EpisodeConfig, segment_episodes, token_char_ends
from l2t_verl.warm_start import is_necessary_step

__all__ = ["EpisodeBreakdown", "classify_episode", "episode_breakdown", "redundant_tokens"]

# Prefixes of the redundant episodes l2t_verl.warm_start._redundant_episode writes.
REDUNDANT_PREFIXES = ("Check:", "So far we have", "Let me re-read the question")
_THINK_OPEN = "<think>"


def classify_episode(text: str) -> str:
    """``"step"``, ``"redundant"`` or ``"other"`` for one episode's text (see the module docstring)."""
    body = text.replace(_THINK_OPEN, "").strip()
    if any(body.startswith(p) for p in REDUNDANT_PREFIXES):
        return "redundant"
    if is_necessary_step(body):
        return "step"
    return "other"


@dataclass
class EpisodeBreakdown:
    """Episodes of one response and the tokens each kind took (tail = ``</think>`` and the answer)."""

    kinds: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: {"step": 0, "redundant": 0, "other": 0, "tail": 0})

    @property
    def num_redundant(self) -> int:
        return self.kinds.count("redundant")


def episode_breakdown(response_ids: Sequence[int], tokenizer: Any) -> EpisodeBreakdown:
    """Segment ``response_ids`` as the trainer does and count the tokens of each episode kind.

    Trailing EOS/pad ids belong to no episode and are counted in ``tail`` with the answer, so the
    four counts add up to ``len(response_ids)``.
    """
    ids = [int(t) for t in response_ids]
    # max_episodes is lifted: the benchmark counts every episode, it does not cap them like the trainer.
    ends = segment_episodes(ids, tokenizer, EpisodeConfig(max_episodes=10_000))
    out = EpisodeBreakdown(ends=list(ends))
    if not ends:
        out.tokens["tail"] = len(ids)
        return out
    text, char_ends = token_char_ends(ids[: ends[-1]], tokenizer)
    start = 0
    for end in ends:
        # Character span of tokens [start, end): from the end of token start-1 to the end of token end-1.
        lo = char_ends[start - 1] if start else 0
        kind = classify_episode(text[lo : char_ends[end - 1]])
        out.kinds.append(kind)
        out.tokens[kind] += end - start
        start = end
    out.tokens["tail"] = len(ids) - ends[-1]
    return out


def redundant_tokens(response_ids: Sequence[int], tokenizer: Any) -> int:
    """Number of tokens of ``response_ids`` spent in redundant episodes."""
    return episode_breakdown(response_ids, tokenizer).tokens["redundant"]
