"""Forced answering: stop a response's reasoning at a token index and make the model answer.

This is the mechanism behind both the token-budget curve (paper Fig. 3) and the episode-depth
analysis (paper Fig. 1). A probe is ``prompt ids + response ids[:cut] + ids(force_suffix)``, built
by concatenating token ids (the response is never re-tokenized, docs/method.md §1), followed by a
greedy answer
of at most ``answer_tokens`` tokens. The scored text is ``decode(response[:cut]) + force_suffix +
answer``, where the answer is cut where it closes the braces the force suffix left open (see
:func:`cut_forced_answer`), so a model that keeps talking cannot replace its forced answer by a later
``\\boxed{}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from l2t_verl.episodes import THINK_CLOSE, char_to_token_ends, token_char_ends
from l2t_verl.evaluation.backends import GenerationBackend, SamplingConfig
from l2t_verl.evaluation.errors import EvaluationError
from l2t_verl.scoring.text import closing_brace, open_braces
from l2t_verl.settings import DEFAULT_FORCE_SUFFIX

__all__ = [
    "ForceConfig",
    "ForcedAnswer",
    "ForcedAnswerer",
    "DEFAULT_FORCE_SUFFIX",
    "cut_forced_answer",
    "reasoning_end",
    "strip_stop_tokens",
]


@dataclass(frozen=True)
class ForceConfig:
    """``force_suffix`` closes the reasoning and opens the answer (the J_r probe suffix of docs/method.md §2);
    ``answer_suffix`` is what ends an answer (arith: ``"}."``); ``answer_tokens`` caps the answer."""

    force_suffix: str = DEFAULT_FORCE_SUFFIX
    answer_suffix: str = "}"
    answer_tokens: int = 32

    def validate(self) -> ForceConfig:
        if not isinstance(self.force_suffix, str) or not self.force_suffix:
            raise EvaluationError(f"force_suffix must be a non-empty string; got {self.force_suffix!r}")
        if not isinstance(self.answer_suffix, str):
            raise EvaluationError(f"answer_suffix must be a string; got {self.answer_suffix!r}")
        if (
            isinstance(self.answer_tokens, bool)
            or not isinstance(self.answer_tokens, int)
            or self.answer_tokens < 1
        ):
            raise EvaluationError(f"answer_tokens must be an integer >= 1; got {self.answer_tokens!r}")
        return self


@dataclass(frozen=True)
class ForcedAnswer:
    text: str  # decode(prefix) + force_suffix + answer: what the verifier scores
    answer: str  # the generated answer after the force suffix, already cut
    overflow: bool = False  # the probe did not fit the model's context: nothing was generated


def cut_forced_answer(answer: str, opened: int, answer_suffix: str) -> str:
    """Cut a forced answer where it ends.

    With ``opened > 0`` braces left open by the force suffix, the answer ends at the brace that closes
    them, extended by the rest of ``answer_suffix`` when the text continues with it (arith: ``"36}."``).
    With none open, it ends after the first ``answer_suffix``. Otherwise the whole answer is kept.
    """
    if opened > 0:
        i = closing_brace(answer, 0, opened)
        if i is None:
            return answer
        end = i + len(answer_suffix) if answer_suffix and answer.startswith(answer_suffix, i) else i + 1
        return answer[:end]
    if answer_suffix:
        at = answer.find(answer_suffix)
        if at >= 0:
            return answer[: at + len(answer_suffix)]
    return answer


def strip_stop_tokens(ids: Sequence[int], tokenizer: Any) -> list[int]:
    """``ids`` without trailing EOS / pad tokens (they are not part of the text)."""
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if isinstance(t, int)}
    out = [int(t) for t in ids]
    while out and out[-1] in stops:
        out.pop()
    return out


def reasoning_end(response_ids: Sequence[int], tokenizer: Any) -> int:
    """Token index where the reasoning span ends (docs/method.md §1): before the first ``</think>``,
    else the end of the response without its trailing EOS. Found on character offsets, never by
    re-tokenizing."""
    ids = strip_stop_tokens(response_ids, tokenizer)
    if not ids:
        return 0
    text, char_ends = token_char_ends(ids, tokenizer)
    at = text.find(THINK_CLOSE)
    if at < 0:
        return len(ids)
    if at == 0:
        return 0
    return char_to_token_ends(char_ends, [at])[0]


class ForcedAnswerer:
    """Builds, de-duplicates and runs forced-answer probes on a backend (greedy answers).

    Identical probes (e.g. the k = 0 probe of every sample of one prompt, or a budget cut that
    equals an episode cut) are generated once; results are cached for the answerer's lifetime.
    """

    def __init__(self, backend: GenerationBackend, force: ForceConfig) -> None:
        self.backend = backend
        self.force = force.validate()
        tok = backend.tokenizer
        self.force_ids = [int(t) for t in tok.encode(force.force_suffix, add_special_tokens=False)]
        self.opened = open_braces(force.force_suffix)
        self._cache: dict[tuple[int, ...], ForcedAnswer] = {}
        self.overflows = 0

    def _fits(self, probe: Sequence[int]) -> bool:
        limit = self.backend.max_model_len
        return limit is None or len(probe) + 1 <= limit

    def answer(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "forced answers"
    ) -> list[ForcedAnswer]:
        """``items`` are ``(prompt_ids, response_prefix_ids)``; one :class:`ForcedAnswer` each."""
        tok = self.backend.tokenizer
        probes = [tuple(int(t) for t in (*prompt, *prefix, *self.force_ids)) for prompt, prefix in items]
        todo = [p for p in dict.fromkeys(probes) if p not in self._cache and self._fits(p)]
        if todo:
            sampling = SamplingConfig(n=1, temperature=0.0, top_p=1.0, max_tokens=self.force.answer_tokens)
            outs = self.backend.generate([list(p) for p in todo], sampling, desc=desc)
            for probe, (gen,) in zip(todo, outs, strict=True):
                raw = tok.decode(strip_stop_tokens(gen.token_ids, tok), skip_special_tokens=True)
                self._cache[probe] = ForcedAnswer(
                    "", cut_forced_answer(raw, self.opened, self.force.answer_suffix)
                )
        results = []
        for (_, prefix), probe in zip(items, probes, strict=True):
            hit = self._cache.get(probe)
            if hit is None:  # did not fit the context window
                self.overflows += 1
                results.append(ForcedAnswer("", "", overflow=True))
                continue
            head = tok.decode([int(t) for t in prefix], skip_special_tokens=True)
            results.append(ForcedAnswer(head + self.force.force_suffix + hit.answer, hit.answer))
        return results
