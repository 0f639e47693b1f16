"""What a J_r probe asks (docs/method.md §2): the probe prompts at the episode boundaries and the answer
they are scored on.

For a response cut into episodes with END token indices ``ends``, the probe before episode ``k+1``
(k = 0..K) is ``prompt_ids + response_ids[:b_k] + force_ids`` with ``b_0 = 0``, ``b_k = ends[k-1]``.
Token ids are never re-tokenized: the force suffix and the answer are tokenized once, on their own,
and concatenated to the sampled ids (docs/method.md §1: BPE does not round-trip). The answer target
is the normalised ground truth plus ``answer_suffix``. :mod:`l2t_verl.progress` sends the probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from l2t_verl.episodes import THINK_CLOSE, check_episode_ends
from l2t_verl.scoring.text import closing_brace
from l2t_verl.settings import L2TConfigError, ProgressConfig

__all__ = [
    "answer_token_ids",
    "check_answer_suffix",
    "ends_with_think_close",
    "force_token_ids",
    "forced_probe_prompts",
    "ground_truth_text",
    "normalize_answer",
    "probe_boundaries",
    "probe_prompts",
]


def probe_boundaries(episode_ends: Sequence[int]) -> list[int]:
    """Response prefix lengths probed: ``[0, *episode_ends]`` (K+1 values; ``[]`` when K = 0)."""
    ends = [int(e) for e in episode_ends]
    return [0, *ends] if ends else []


def probe_prompts(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    episode_ends: Sequence[int],
    force_ids: Sequence[int],
    closed_force_ids: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """``prompt_ids + response_ids[:b_k] + force`` for every boundary ``b_k``.

    ``force`` is ``closed_force_ids`` where the prefix already ends with ``</think>`` (needs
    ``tokenizer`` to see it), else ``force_ids``.
    """
    prompt, response, force = (list(map(int, x)) for x in (prompt_ids, response_ids, force_ids))
    check_episode_ends(episode_ends, len(response))
    prompts = []
    for b in probe_boundaries(episode_ends):
        prefix = prompt + response[:b]
        suffix = force
        if (
            closed_force_ids is not None
            and tokenizer is not None
            and ends_with_think_close(tokenizer, prefix)
        ):
            suffix = list(map(int, closed_force_ids))
        prompts.append(prefix + suffix)
    return prompts


def forced_probe_prompts(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    episode_ends: Sequence[int],
    tokenizer: Any,
    cfg: ProgressConfig,
) -> list[list[int]]:
    """The K+1 probe prompts of a response with the configured force suffix, closing the reasoning only
    where the prefix has not closed it already (docs/method.md §2)."""
    return probe_prompts(
        prompt_ids,
        response_ids,
        episode_ends,
        force_token_ids(tokenizer, cfg),
        force_token_ids(tokenizer, cfg, closed=True),
        tokenizer,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(t) for t in ids]


def force_token_ids(tokenizer: Any, cfg: ProgressConfig, closed: bool = False) -> list[int]:
    """The force suffix, tokenized on its own (it is appended to sampled ids, never merged with them).

    ``closed``: the prefix already ends with ``</think>`` (every probe after an episode in
    ``think_tags`` mode), so the part of the suffix up to and including its own ``</think>`` is left
    out: the reasoning must not be closed twice.
    """
    text = cfg.force_suffix
    if closed and THINK_CLOSE in text:
        text = text.split(THINK_CLOSE, 1)[1]
    return _encode(tokenizer, text)


_TAIL_TOKENS = 16


def ends_with_think_close(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether the text of ``ids`` ends with ``</think>`` (trailing white space aside)."""
    tail = tokenizer.decode([int(t) for t in ids[-_TAIL_TOKENS:]], skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_CLOSE)


_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


_BOXED = "\\boxed{"


def normalize_answer(text: str) -> str:
    """``y*`` as the policy writes it inside the force suffix's ``\\boxed{``: surrounding white space,
    ``$...$``, ``\\(...\\)`` and a whole-answer ``\\boxed{...}`` stripped, repeatedly (the verifier
    accepts those forms; the probe must not ask the policy to write them a second time)."""
    while True:
        before = text
        text = text.strip()
        for left, right in _WRAPPERS:
            inner = text[len(left) : len(text) - len(right)]
            # "$a$ and $b$" is not one wrapped answer: the inner part must not close it early.
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                if right not in inner:
                    text = inner
                    break
        if text.startswith(_BOXED) and closing_brace(text, len(_BOXED), 1) == len(text) - 1:
            text = text[len(_BOXED) : -1]
        if text == before:
            return text


def ground_truth_text(ground_truth: Any) -> str | None:
    """The answer string a probe should produce (:func:`normalize_answer`), or ``None`` when there is
    no usable one.

    Strings and numbers are used as they are; for a list of acceptable answers the first one is
    the probe target (the likelihood estimator needs one token sequence).
    """
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, str):
        ground_truth = ground_truth.tolist()  # numpy/torch values from a parquet row
    if isinstance(ground_truth, (list, tuple)):
        return ground_truth_text(ground_truth[0]) if ground_truth else None
    if ground_truth is None or isinstance(ground_truth, bool):
        return None
    text = normalize_answer(str(ground_truth))
    return text if text else None


_CONTINUATIONS = (".", ",", "\n", " ", "$")


def check_answer_suffix(tokenizer: Any, answer_suffix: str) -> None:
    """Start-up check (section 2): the ids of ``answer_suffix`` must stay a prefix of the ids of
    ``answer_suffix`` followed by a common continuation. Otherwise BPE merges the closing with what
    the policy writes next, and the scored token is one the policy never emits (J_r ~ 1e-9).
    Raises ``L2TConfigError`` naming ``l2t.progress.answer_suffix`` and the merged token."""
    if not answer_suffix:
        return
    closing = _encode(tokenizer, answer_suffix)
    for cont in _CONTINUATIONS:
        merged = _encode(tokenizer, answer_suffix + cont)
        if merged[: len(closing)] != closing:
            first = next(i for i, (a, b) in enumerate(zip(closing, merged, strict=False)) if a != b)
            token = tokenizer.decode(merged[first : first + 1])
            raise L2TConfigError(
                f"l2t.progress.answer_suffix={answer_suffix!r} merges with a following {cont!r} into the "
                f"token {token!r}, which the probe would then never score; end answer_suffix with what the "
                f"model writes after its answer (e.g. {answer_suffix + cont!r})"
            )


def answer_token_ids(tokenizer: Any, ground_truth: str, cfg: ProgressConfig) -> list[int]:
    """``ground_truth + answer_suffix`` tokenized on its own (docs/method.md §2: ``y*`` plus the closing
    ``}``)."""
    return _encode(tokenizer, ground_truth + cfg.answer_suffix)
