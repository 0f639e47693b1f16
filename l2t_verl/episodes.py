"""Token-exact episode segmentation of a sampled response (docs/method.md §1).

A response ``z`` is cut into ``z = z_1 + ... + z_K + tail``. Boundaries are found on the decoded
text (character offsets) and mapped back to token indices through an incremental decode of the
response's own ids. Text is never re-tokenized: BPE does not round-trip, so re-encoding a piece
could give ids that the policy never sampled.

Episode boundaries are returned as exclusive END token indices ``ends`` (strictly increasing);
episode ``k`` covers tokens ``[ends[k-1], ends[k])`` with ``ends[-1] == 0`` and the tail is
``[ends[K-1], len(response))``.

This module does not import verl, so rollout workers and tests can use it cheaply.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EPISODE_MODES",
    "THINK_CLOSE",
    "EpisodeConfig",
    "cap_episodes",
    "check_episode_ends",
    "char_to_token_ends",
    "episode_ids_for",
    "merge_short_episodes",
    "segment_episodes",
    "token_char_ends",
]

EPISODE_MODES = ("think_tags", "delimiter")
THINK_CLOSE = "</think>"
_REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode emits for an incomplete byte sequence


@dataclass(frozen=True)
class EpisodeConfig:
    """``l2t.episodes`` settings (docs/method.md §1).

    mode: ``think_tags`` (every ``</think>`` closes an episode) or ``delimiter`` (the reasoning
        span is split at the regex ``delimiter``).
    min_episode_tokens: pieces shorter than this are merged into the next piece.
    max_episodes: K, the cap on episodes per response (paper App. F.1 uses 20).
    """

    mode: str = "delimiter"
    delimiter: str = r"\n\n"
    min_episode_tokens: int = 1
    max_episodes: int = 20

    def validate(self) -> EpisodeConfig:
        """Raise ``ValueError`` naming the offending key (docs/method.md §8); return ``self`` for chaining."""
        if self.mode not in EPISODE_MODES:
            raise ValueError(f"l2t.episodes.mode must be one of {list(EPISODE_MODES)}; got {self.mode!r}")
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ValueError(
                f"l2t.episodes.delimiter must be a non-empty regex string; got {self.delimiter!r}"
            )
        try:
            pattern = re.compile(self.delimiter)
        except re.error as exc:
            raise ValueError(
                f"l2t.episodes.delimiter is not a valid regex ({exc}); got {self.delimiter!r}"
            ) from exc
        # A pattern that matches "" would put a boundary between every pair of characters.
        if pattern.fullmatch(""):
            raise ValueError(
                f"l2t.episodes.delimiter must not match the empty string; got {self.delimiter!r}"
            )
        for key in ("min_episode_tokens", "max_episodes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"l2t.episodes.{key} must be an integer >= 1; got {value!r}")
        return self


def token_char_ends(response_ids: Sequence[int], tokenizer: Any) -> tuple[str, list[int]]:
    """Decode ``response_ids`` incrementally; return ``(text, char_ends)``.

    ``char_ends[i]`` is the number of characters of ``text`` completed by tokens ``0..i``, so
    token ``i`` covers ``text[char_ends[i-1]:char_ends[i]]``. A character whose UTF-8 bytes are
    split over several tokens is credited to the token that completes it; complete characters
    before the split stay with the token that carries them.

    The scheme is the usual incremental detokenizer (as in vLLM/TGI): decode a short window that
    starts one committed chunk back, so tokenizers that drop a leading space at the start of a
    decode (SentencePiece) still produce the same text as one full decode; a window whose text
    ends in U+FFFD is waiting for the rest of a multi-byte character and is not committed yet.
    Two small decodes per token: linear in the response length. Offsets always refer to the
    returned ``text``; for invalid UTF-8 (not produced by well-formed text) a byte-fallback
    decoder may render a run of bytes differently than one full decode would.
    """
    ids = [int(t) for t in response_ids]

    def decode(window: list[int]) -> str:
        return tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    n_chars = 0
    prefix_offset = read_offset = 0  # ids[prefix_offset:read_offset] is committed context
    prefix_text = ""
    char_ends: list[int] = []
    for i in range(len(ids)):
        window_text = decode(ids[prefix_offset : i + 1])
        complete = window_text.rstrip(_REPLACEMENT_CHAR)
        if len(complete) == len(window_text):
            new_text = window_text[len(prefix_text) :]
            pieces.append(new_text)
            n_chars += len(new_text)
            prefix_offset, read_offset = read_offset, i + 1
            prefix_text = decode(ids[prefix_offset:read_offset])
            char_ends.append(n_chars)
        else:
            pending_complete = max(0, len(complete) - len(prefix_text))
            char_ends.append(max(char_ends[-1] if char_ends else 0, n_chars + pending_complete))
    if read_offset < len(ids):
        # The response ends inside a multi-byte character: flush it as the lossy decode shows it.
        new_text = decode(ids[prefix_offset:])[len(prefix_text) :]
        pieces.append(new_text)
        n_chars += len(new_text)
        char_ends[-1] = n_chars
    return "".join(pieces), char_ends


def char_to_token_ends(char_ends: Sequence[int], char_positions: Sequence[int]) -> list[int]:
    """Map exclusive character end positions to exclusive token end indices.

    A boundary at character ``c`` (text[:c] is before it) goes just after the token that holds
    character ``c - 1``; a token straddling the boundary therefore belongs to the piece it ends.
    Positions ``<= 0`` map to 0. Output is sorted and de-duplicated.
    """
    out = set()
    for c in char_positions:
        out.add(0 if c <= 0 else min(bisect_left(char_ends, c) + 1, len(char_ends)))
    return sorted(out)


def _boundary_chars(text: str, cfg: EpisodeConfig) -> tuple[list[int], int]:
    """Return (interior boundary character positions, end of the reasoning span in characters)."""
    if cfg.mode == "think_tags":
        closes = [m.end() for m in re.finditer(re.escape(THINK_CLOSE), text)]
        if not closes:
            return [], len(text)
        return closes[:-1], closes[-1]
    # delimiter mode: the reasoning span stops before the first </think>, so the probes of
    # docs/method.md §2 can append their own "</think> ..." suffix after any episode prefix.
    span_end = text.find(THINK_CLOSE)
    if span_end < 0:
        span_end = len(text)
    cuts = [
        m.end()
        for m in re.finditer(cfg.delimiter, text[:span_end])
        if m.end() > m.start()  # zero-width matches carry no delimiter text
    ]
    return cuts, span_end


def merge_short_episodes(ends: Sequence[int], min_tokens: int) -> list[int]:
    """Drop boundaries so that every episode has >= ``min_tokens`` tokens where possible.

    A short piece merges into the NEXT one; a short last piece merges into the previous one.
    ``ends[-1]`` (end of the reasoning span) is always kept.
    """
    if not ends:
        return []
    final = ends[-1]
    kept: list[int] = []
    start = 0
    for end in ends:
        if end - start >= min_tokens:
            kept.append(end)
            start = end
    if not kept:
        return [final]
    kept[-1] = final  # a short leftover before `final` joins the previous episode
    return kept


def cap_episodes(ends: Sequence[int], max_episodes: int) -> list[int]:
    """Keep at most ``max_episodes`` episodes (docs/method.md §1).

    The final end is kept; of the interior boundaries, the K-1 closest to equal token spacing
    ``j * ends[-1] / K`` (j = 1..K-1) are kept, each target greedily taking its nearest unused
    boundary (ties go to the earlier one). Dropping boundaries only lengthens episodes, so a
    ``min_episode_tokens`` guarantee made before the cap still holds after it.
    """
    ends = list(ends)
    if len(ends) <= max_episodes:
        return ends
    final, interior = ends[-1], ends[:-1]
    chosen: set[int] = set()
    for j in range(1, max_episodes):
        target = j * final / max_episodes
        best = min((b for b in interior if b not in chosen), key=lambda b: (abs(b - target), b))
        chosen.add(best)
    return sorted(chosen) + [final]


def _trailing_stop_ids(tokenizer: Any) -> set[int]:
    ids = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}
    return {int(i) for i in ids if isinstance(i, int)}


def segment_episodes(
    response_ids: Sequence[int], tokenizer: Any, cfg: EpisodeConfig | None = None
) -> list[int]:
    """Episode END token indices of a response (docs/method.md §1).

    - ``think_tags``: each ``</think>`` closes an episode; the boundary is just after the token
      that completes the tag. Text after the last ``</think>`` is the tail.
    - ``delimiter``: the reasoning span (up to the first ``</think>``, else the whole response)
      is split after the token containing the end of each delimiter match; the last piece of
      the span, if non-empty, is an episode too. ``</think>`` and what follows are the tail.
    - Trailing EOS / pad ids are never part of an episode (they are not reasoning).
    - Then ``merge_short_episodes`` (``min_episode_tokens``) and ``cap_episodes`` (``max_episodes``).

    No boundary found gives K = 1 (the whole reasoning span); an empty response or empty
    reasoning span gives K = 0 (``[]``, outcome reward only). Neither is an error.
    """
    cfg = (cfg or EpisodeConfig()).validate()
    ids = [int(t) for t in response_ids]
    stop_ids = _trailing_stop_ids(tokenizer)
    n = len(ids)
    while n > 0 and ids[n - 1] in stop_ids:
        n -= 1
    if n == 0:
        return []
    text, char_ends = token_char_ends(ids[:n], tokenizer)
    cuts, span_end_char = _boundary_chars(text, cfg)
    if span_end_char <= 0:
        return []
    (span_end,) = char_to_token_ends(char_ends, [span_end_char])
    ends = [e for e in char_to_token_ends(char_ends, cuts) if 0 < e < span_end] + [span_end]
    ends = merge_short_episodes(ends, cfg.min_episode_tokens)
    return cap_episodes(ends, cfg.max_episodes)


def check_episode_ends(ends: Sequence[int], response_len: int) -> list[int]:
    """``ends`` as ints if they are strictly increasing within ``[1, response_len]``, else ``ValueError``.

    The one place that says what valid exclusive episode END indices are (episodes, probes, rewards
    and the per-sample record all rely on it).
    """
    values = [int(e) for e in ends]
    if any(b <= a for a, b in zip([0, *values], values, strict=False)) or (
        values and values[-1] > response_len
    ):
        raise ValueError(f"episode_ends must be strictly increasing within [1, {response_len}]; got {values}")
    return values


def episode_ids_for(response_len: int, ends: Sequence[int]) -> list[int]:
    """Per-token episode index for a response of ``response_len`` tokens; -1 for the tail."""
    ends = check_episode_ends(ends, response_len)
    out = [-1] * response_len
    start = 0
    for k, end in enumerate(ends):
        out[start:end] = [k] * (end - start)
        start = end
    return out
