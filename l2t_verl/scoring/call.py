"""Calling an outcome verifier (a verl ``compute_score``) from asyncio code, with a timeout.

The reward manager (:mod:`l2t_verl.reward_manager`) and the sampling J_r probes
(:mod:`l2t_verl.progress`) both score text this way; a verifier that raises, times out or returns a
non-finite score makes :func:`call_verifier` raise, and each caller scores that as 0 / incorrect and
counts it (docs/method.md §8).

Timeouts, in seconds, per verifier call:

- :data:`REWARD_VERIFIER_TIMEOUT_S` (60): the outcome reward of one response, when ``reward.timeout``
  is unset. Generous: a response that times out loses its whole reward, and code verifiers run unit
  tests in a sandbox.
- :data:`PROBE_VERIFIER_TIMEOUT_S` (10): one forced continuation of the ``sampling`` J_r estimator. Short:
  a continuation is only ``max_answer_tokens`` long, there are ``(K + 1) * num_samples`` of them per
  response, and the whole probe set also runs under ``l2t.progress.timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

__all__ = ["PROBE_VERIFIER_TIMEOUT_S", "REWARD_VERIFIER_TIMEOUT_S", "call_verifier", "verifier_score"]

REWARD_VERIFIER_TIMEOUT_S = 60.0
PROBE_VERIFIER_TIMEOUT_S = 10.0


def verifier_score(result: Any) -> float:
    """A verifier's return value (a number or verl's ``{"score": ...}`` dict) as a finite float.

    A non-finite score raises ``ValueError``: it would poison every advantage of its group.
    """
    if isinstance(result, dict):
        result = result["score"]
    value = float(result)
    if not math.isfinite(value):
        raise ValueError(f"verifier returned a non-finite score {value!r}")
    return value


async def call_verifier(
    verifier: Callable[..., Any], timeout_s: float, /, *args: Any, **kwargs: Any
) -> float:
    """``verifier(*args, **kwargs)`` as a float (:func:`verifier_score`), or ``TimeoutError`` after
    ``timeout_s`` seconds. A coroutine function is awaited; a plain one runs in the loop's default
    executor.

    A synchronous verifier that times out keeps its executor thread until it returns: Python threads
    cannot be killed, so the timeout frees the caller, not the thread.
    """
    if inspect.iscoroutinefunction(verifier):
        pending = verifier(*args, **kwargs)
    else:
        # In a thread: verifiers may be slow (sympy, sandboxed tests), and the event loop is shared by
        # every in-flight response.
        call = functools.partial(verifier, *args, **kwargs)
        pending = asyncio.get_running_loop().run_in_executor(None, call)
    return verifier_score(await asyncio.wait_for(pending, timeout_s))
