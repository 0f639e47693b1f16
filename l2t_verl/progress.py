"""J_r probes at the episode boundaries of one response (docs/method.md §2).

For a response cut into episodes with END token indices ``ends`` (``l2t_verl.episodes``), the
probe before episode ``k+1`` (k = 0..K) is::

    prompt_ids + response_ids[:b_k] + force_ids        b_0 = 0, b_k = ends[k-1]

and ``J_r`` at that state is the probability that the policy answers correctly when forced to
answer there. ``delta_J_k = J_r(b_k) - J_r(b_{k-1})`` for k = 1..K.

Estimators (``l2t.progress.estimator``):

- ``likelihood``: ``J_r = exp(sum log p(answer ids | probe))`` with answer ids = the tokenization
  of ``ground_truth + answer_suffix``, scored prefill-only through vLLM's ``prompt_logprobs``
  convention (``TokenOutput.extra_fields["prompt_logprobs"][i]`` = ``[log p(token i+1)]``, last
  entry a dummy). verl's vLLM server and the local ``hf`` server both return that format.
  vLLM does not read its prefix cache for such requests unless told to, so by default every probe
  re-prefills its whole prefix; ``l2t.progress.prefix_cache`` (opt-in) lets it read the cache and
  parses only the answer's entries, right-aligned (:func:`likelihood_from_answer_logprobs`).
- ``sampling``: M forced continuations per probe (separate requests, distinct seeds), each
  scored by the outcome verifier on ``force_suffix + decoded continuation``; ``J_r`` = fraction
  scoring >= 0.5 (the verifiers here are {0, 1}). A verifier exception or timeout (default
  :data:`l2t_verl.scoring.call.PROBE_VERIFIER_TIMEOUT_S`, 10 s a call) counts as incorrect and is
  counted in ``verifier_errors``.

The probe prompts and their answer targets are built in :mod:`l2t_verl.probes`.

K = 0 (empty response or empty reasoning span): no probe is sent and ``jr == delta_j == []``;
there is no episode to credit, so ``J_0`` alone would only cost a request.

A failed probe request (exception, aborted request, malformed reply, or the whole set running
past ``ProgressConfig.probe_timeout_s(K + 1)``) gives ``failed=True`` with ``jr == delta_j == []``:
that response gets the outcome reward only (docs/method.md §8). Nothing here raises for a bad probe.

This module talks to the server through a plain ``generate(prompt_ids, sampling_params)``
coroutine, so it runs against verl's ``LLMServerClient``, the local ``hf`` server, or a test stub.
It must not import the actor side (penalty / worker extensions).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from l2t_verl.probes import (
    answer_token_ids,
    forced_probe_prompts,
    ground_truth_text,
    probe_boundaries,
)
from l2t_verl.scoring.call import PROBE_VERIFIER_TIMEOUT_S, call_verifier
from l2t_verl.settings import ProgressConfig

__all__ = [
    "GenerateFn",
    "ProbeError",
    "ProgressResult",
    "VerifierFn",
    "compute_progress",
    "deltas",
    "likelihood_from_answer_logprobs",
    "likelihood_from_prompt_logprobs",
    "likelihood_params",
]

GenerateFn = Callable[[list[int], dict[str, Any]], Awaitable[Any]]
"""``await generate(prompt_ids, sampling_params)`` -> an object with ``token_ids`` and ``extra_fields``
(verl's ``TokenOutput``)."""

VerifierFn = Callable[..., Any]
"""``verifier(data_source, solution_str, ground_truth, extra_info)`` -> float or ``{"score": float}``."""

# Continuations scored at or above this count as correct; the project's verifiers return 0 or 1.
_CORRECT_THRESHOLD = 0.5


class ProbeError(RuntimeError):
    """A probe reply that cannot be used (aborted, malformed, non-finite)."""


@dataclass
class ProgressResult:
    """J_r probes of one response.

    jr: K+1 values in [0, 1] (``J_r`` before episode 1, after episode 1, ..., after episode K);
        empty when K = 0 or the probes failed.
    delta_j: K values ``jr[k] - jr[k-1]``; empty when K = 0 or the probes failed.
    probe_tokens: tokens the server had to compute for the probes (prompt tokens not served from
        its prefix cache, per ``num_cached_tokens`` when reported, plus generated tokens).
    probe_time_s: wall time of the probe round trip for this response.
    failed / error: a probe request failed; the response gets the outcome reward only.
    verifier_errors: verifier exceptions/timeouts (sampling estimator), each scored incorrect.
    cache_fallbacks: likelihood probes sent again without the prefix cache because the cached reply
        lacked a usable log-prob for an answer token (``l2t.progress.prefix_cache`` only).
    """

    jr: list[float] = field(default_factory=list)
    delta_j: list[float] = field(default_factory=list)
    probe_tokens: int = 0
    probe_time_s: float = 0.0
    failed: bool = False
    error: str | None = None
    verifier_errors: int = 0
    cache_fallbacks: int = 0


# Enough tokens to hold "</think>" even where it is not one special token (8 characters, each at
# worst one byte-level token), plus trailing white space.
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


# What a policy commonly writes right after the closing of its answer (section 2).
def deltas(jr: Sequence[float]) -> list[float]:
    """``delta_J_k = J_r[k] - J_r[k-1]`` for k = 1..K."""
    return [float(b) - float(a) for a, b in zip(jr, jr[1:], strict=False)]


def _check_lengths(total_len: int, answer_len: int) -> None:
    if answer_len < 1 or total_len <= answer_len:
        raise ProbeError(f"cannot score {answer_len} answer tokens in a sequence of {total_len}")


def _entry_value(entry: Any) -> float | None:
    """The log-prob of one ``prompt_logprobs`` entry (``[logp]`` or a bare number); ``None`` when absent."""
    if isinstance(entry, (list, tuple)):
        entry = entry[0] if entry else None
    return None if entry is None else float(entry)


def _likelihood(values: Sequence[float]) -> float:
    total = 0.0
    for value in values:
        if math.isnan(value) or value > 1e-6:
            raise ProbeError(f"prompt_logprobs holds an invalid log-prob {value!r}")
        total += value
    return min(1.0, max(0.0, math.exp(total)))


def likelihood_from_prompt_logprobs(prompt_logprobs: Sequence[Any], total_len: int, answer_len: int) -> float:
    """``exp(sum log p(answer))`` from a ``prompt_logprobs`` reply over ``probe + answer`` ids.

    Entry ``i`` holds ``[log p(token i+1)]`` and the last entry is a dummy, so the answer tokens
    at positions ``total_len - answer_len .. total_len - 1`` are entries
    ``total_len - answer_len - 1 .. total_len - 2``.
    """
    _check_lengths(total_len, answer_len)
    if prompt_logprobs is None or len(prompt_logprobs) != total_len:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise ProbeError(f"prompt_logprobs must have one entry per prompt token ({total_len}); got {got}")
    values = [_entry_value(e) for e in prompt_logprobs[total_len - answer_len - 1 : total_len - 1]]
    if any(v is None for v in values):
        raise ProbeError("prompt_logprobs has no log-prob for an answer token")
    return _likelihood(values)


def likelihood_from_answer_logprobs(
    prompt_logprobs: Sequence[Any] | None,
    total_len: int,
    answer_len: int,
    num_cached_tokens: int | None,
) -> float | None:
    """``exp(sum log p(answer))`` from a reply that may have read the prefix cache, or ``None`` when the
    reply does not hold a log-prob it can be trusted for at every answer token (the caller then scores the
    probe again without the cache).

    A prefix-cached reply covers only the positions the server computed, so it is read right-aligned:
    the last entry is the dummy and the ``answer_len`` entries before it are the answer tokens. With
    ``c = num_cached_tokens`` the server computes the logits of positions ``c .. total_len - 1``, i.e.
    the log-probs of tokens ``c + 1 .. total_len - 1``: the reply holds ``total_len - c`` entries with the
    dummy, or all ``total_len`` with the cached ones empty (the local ``hf`` server fills them all).
    The answer was computed only when ``c <= total_len - answer_len - 1``. Past that, or with an unknown
    ``c``, or a length that fits neither form, the entries cannot be placed and the answer is ``None``:
    a misplaced entry would be a wrong ``J_r`` that no value check can see.
    """
    _check_lengths(total_len, answer_len)
    if prompt_logprobs is None:
        return None
    n = len(prompt_logprobs)
    if n > total_len:
        raise ProbeError(f"prompt_logprobs has {n} entries for a prompt of {total_len} tokens")
    if isinstance(num_cached_tokens, bool) or not isinstance(num_cached_tokens, (int, float)):
        return None
    cached = int(num_cached_tokens)
    if cached < 0 or cached > total_len - answer_len - 1 or n not in (total_len, total_len - cached):
        return None
    values = [_entry_value(e) for e in prompt_logprobs[n - answer_len - 1 : n - 1]]
    if any(v is None for v in values):
        return None
    return _likelihood(values)


def likelihood_params(max_tokens: int, read_prefix_cache: bool | None = None) -> dict[str, Any]:
    """Sampling parameters of a likelihood probe.

    ``detokenize=False``: only log-probs are read, and vLLM would otherwise decode a string for every
    prompt position. ``read_prefix_cache``: ``None`` leaves ``skip_reading_prefix_cache`` unset (vLLM
    then skips the cache for prompt log-prob requests; releases without that field accept the request),
    a bool sets it.
    """
    params: dict[str, Any] = {
        "prompt_logprobs": 0,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "detokenize": False,
    }
    if read_prefix_cache is not None:
        params["skip_reading_prefix_cache"] = not read_prefix_cache
    return params


def _extra(output: Any) -> dict:
    extra = getattr(output, "extra_fields", None)
    if extra is None and isinstance(output, dict):
        extra = output.get("extra_fields")
    return extra or {}


def _check_not_aborted(output: Any) -> None:
    if getattr(output, "stop_reason", None) in ("aborted", "abort"):
        raise ProbeError("probe request was aborted by the rollout server")


def _computed_tokens(output: Any, prompt_len: int) -> int:
    cached = _extra(output).get("num_cached_tokens")
    new_prompt = prompt_len - int(cached) if isinstance(cached, (int, float)) and cached >= 0 else prompt_len
    return max(0, new_prompt) + len(getattr(output, "token_ids", None) or [])


def _default_verifier() -> VerifierFn:
    from l2t_verl.scoring import compute_score

    return compute_score


async def _likelihood_probe(
    generate: GenerateFn, probe: list[int], answer: list[int], max_tokens: int, prefix_cache: bool
) -> tuple[float, int, int, int]:
    """``(J_r, computed tokens, verifier errors, cache fallbacks)`` of one probe."""
    ids = probe + answer
    # vLLM rejects max_tokens=0, so portable callers send 1 greedy token; the local hf server
    # takes 0 and then skips generation entirely (see compute_progress(score_max_tokens=...)).
    tokens = 0
    if prefix_cache:
        output = await generate(ids, likelihood_params(max_tokens, read_prefix_cache=True))
        _check_not_aborted(output)
        extra = _extra(output)
        tokens = _computed_tokens(output, len(ids))
        jr = likelihood_from_answer_logprobs(
            extra.get("prompt_logprobs"), len(ids), len(answer), extra.get("num_cached_tokens")
        )
        if jr is not None:
            return jr, tokens, 0, 0
        params = likelihood_params(max_tokens, read_prefix_cache=False)
    else:
        params = likelihood_params(max_tokens)
    output = await generate(ids, params)
    _check_not_aborted(output)
    jr = likelihood_from_prompt_logprobs(_extra(output).get("prompt_logprobs"), len(ids), len(answer))
    return jr, tokens + _computed_tokens(output, len(ids)), 0, int(prefix_cache)


async def _gather_all_or_cancel(coros: list[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` that cancels the siblings when one fails, so no request is orphaned."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _sampling_probe(
    generate: GenerateFn,
    probe: list[int],
    cfg: ProgressConfig,
    seeds: list[int],
    decode: Callable[[list[int]], str],
    verify: Callable[[str], Awaitable[float]],
) -> tuple[float, int, int, int]:
    # The continuations are decoded here, from their ids: the server's text is never read.
    params = {"temperature": cfg.temperature, "max_tokens": cfg.max_answer_tokens, "detokenize": False}
    outputs = await _gather_all_or_cancel([generate(probe, {**params, "seed": s}) for s in seeds])
    tokens = 0
    for out in outputs:
        _check_not_aborted(out)
        tokens += _computed_tokens(out, len(probe))
    texts = [cfg.force_suffix + decode([int(t) for t in (out.token_ids or [])]) for out in outputs]
    scores = await asyncio.gather(*(verify(text) for text in texts), return_exceptions=True)
    errors = sum(isinstance(s, BaseException) for s in scores)
    correct = sum(1 for s in scores if not isinstance(s, BaseException) and s >= _CORRECT_THRESHOLD)
    return correct / len(seeds), tokens, errors, 0


async def compute_progress(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    episode_ends: Sequence[int],
    ground_truth: Any,
    cfg: ProgressConfig,
    tokenizer: Any,
    generate: GenerateFn,
    *,
    data_source: str | None = None,
    extra_info: dict | None = None,
    verifier: VerifierFn | None = None,
    verifier_timeout_s: float = PROBE_VERIFIER_TIMEOUT_S,
    score_max_tokens: int = 1,
    seed: int | None = None,
) -> ProgressResult:
    """J_r at every episode boundary of one response, all K+1 probes in flight at once.

    Args:
        prompt_ids / response_ids: the ids the policy saw and sampled (never re-tokenized).
        episode_ends: ``l2t_verl.episodes.segment_episodes(response_ids, ...)``.
        ground_truth: ``reward_model.ground_truth`` of the row (see :func:`ground_truth_text`).
        cfg: ``l2t.progress``.
        generate: ``await generate(prompt_ids, sampling_params)`` on the server that generated
            the response (same replica: where the response's KV blocks are, if anything reads them;
            likelihood probes on vLLM do so only with ``cfg.prefix_cache``).
        data_source / extra_info / verifier: for the ``sampling`` estimator; the verifier
            defaults to ``l2t_verl.scoring.compute_score``.
        verifier_timeout_s: per verifier call (sampling estimator); a timeout is a verifier error.
        score_max_tokens: ``max_tokens`` of likelihood probes: 1 for vLLM (which rejects 0),
            0 for the local hf server (prefill only).
        seed: base seed of the sampling estimator's requests; random when ``None``.

    Never raises for a failed probe: see :class:`ProgressResult`.
    """
    start = time.perf_counter()
    bounds = probe_boundaries(episode_ends)
    if not bounds:
        return ProgressResult()
    try:
        prompts = forced_probe_prompts(prompt_ids, response_ids, episode_ends, tokenizer, cfg)
        target = ground_truth_text(ground_truth)
        if target is None:
            raise ProbeError(f"no usable ground truth for the J_r probes: {ground_truth!r}")
    except Exception as exc:  # a bad row or tokenizer must not take the rollout down
        return ProgressResult(failed=True, error=f"{type(exc).__name__}: {exc}")

    verifier_errors = 0
    if cfg.estimator == "likelihood":
        answer = answer_token_ids(tokenizer, target, cfg)
        coros = [_likelihood_probe(generate, p, answer, score_max_tokens, cfg.prefix_cache) for p in prompts]
    else:
        verify_fn = verifier or _default_verifier()
        base = random.getrandbits(30) if seed is None else int(seed)
        m = cfg.num_samples

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        async def verify(text: str) -> float:
            return await call_verifier(
                verify_fn, verifier_timeout_s, data_source, text, ground_truth, extra_info
            )

        coros = [
            _sampling_probe(generate, p, cfg, [base + k * m + j for j in range(m)], decode, verify)
            for k, p in enumerate(prompts)
        ]

    # A long response has many probes; one budget for any K would time out exactly those (then scored
    # on the outcome alone), so the budget grows with the number of probes.
    timeout_s = cfg.probe_timeout_s(len(prompts))
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # Also on our own cancellation: no probe may outlive the response it belongs to.
        for task in tasks:
            if not task.done():
                task.cancel()
    elapsed = time.perf_counter() - start
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    failures = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if failures or pending:
        error = (
            f"{type(failures[0]).__name__}: {failures[0]}"
            if failures
            else (
                f"TimeoutError: {len(pending)} of {len(tasks)} probes unfinished after {timeout_s:g}s "
                f"(l2t.progress.timeout_s={cfg.timeout_s:g} + "
                f"timeout_per_probe_s={cfg.timeout_per_probe_s:g} x {len(prompts)} probes)"
            )
        )
        return ProgressResult(failed=True, error=error, probe_time_s=elapsed)

    jr: list[float] = []
    probe_tokens = 0
    cache_fallbacks = 0
    for task in tasks:
        value, tokens, errors, fallbacks = task.result()
        jr.append(float(value))
        probe_tokens += int(tokens)
        verifier_errors += int(errors)
        cache_fallbacks += int(fallbacks)
    return ProgressResult(
        jr=jr,
        delta_j=deltas(jr),
        probe_tokens=probe_tokens,
        probe_time_s=elapsed,
        verifier_errors=verifier_errors,
        cache_fallbacks=cache_fallbacks,
    )
