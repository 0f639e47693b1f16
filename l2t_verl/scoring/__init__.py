"""Rule-based verifiers behind one verl-compatible ``compute_score``.

Use from verl with ``reward.custom_reward_function.path=pkg://l2t_verl.scoring`` and
``reward.custom_reward_function.name=compute_score`` (a plain file path also works as long as
``l2t_verl`` is importable, because this module uses absolute imports).

Resolving ``data_source`` (case-insensitive) to a verifier, first rule that applies wins:

1. exact registered name, e.g. ``"l2t_arith"``, ``"aime"``, ``"math500"``;
2. the longest registered name that is a prefix of the data_source or of its last ``/``
   component, e.g. ``"aime2024"`` -> ``aime``, ``"agentica-org/deepscaler-preview"`` ->
   ``deepscaler``;
3. data_sources containing ``"math"``, ``"aime"`` or ``"amc"`` -> the math verifier, e.g.
   ``"HuggingFaceH4/MATH-500"``, ``"minerva_math"``;
4. otherwise ``ValueError``: a missing verifier is a configuration error, not a zero reward.

Adding a verifier (e.g. code)::

    # l2t_verl/scoring/code.py
    from l2t_verl.scoring import register_verifier

    @register_verifier("humaneval")
    def score(solution_str, ground_truth, extra_info=None, **kwargs) -> float: ...

and import that module at the bottom of this file so the registration happens on import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Verifier = Callable[..., float]
"""``fn(solution_str, ground_truth, extra_info=None, **kwargs) -> float``"""

_VERIFIERS: dict[str, Verifier] = {}

# Rule 3 above: substrings that mark a competition-math source.
_MATH_MARKERS = ("math", "aime", "amc")
MATH_SOURCES = ("math", "aime", "math500", "amc", "minerva", "numina", "omni_math", "deepscaler")


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator registering ``fn`` as the verifier for data_source ``name`` (case-insensitive)."""
    key = name.lower()

    def decorator(fn: Verifier) -> Verifier:
        existing = _VERIFIERS.get(key)
        if existing is not None and existing is not fn:
            raise ValueError(f"verifier for data_source {name!r} already registered: {existing!r}")
        _VERIFIERS[key] = fn
        return fn

    return decorator


def registered_sources() -> list[str]:
    return sorted(_VERIFIERS)


def get_verifier(data_source: str) -> Verifier:
    """Resolve ``data_source`` with the rules in the module docstring; ``ValueError`` if none."""
    ds = str(data_source).lower()
    if ds in _VERIFIERS:
        return _VERIFIERS[ds]
    tail = ds.rsplit("/", 1)[-1]
    prefixes = [name for name in _VERIFIERS if ds.startswith(name) or tail.startswith(name)]
    if prefixes:
        return _VERIFIERS[max(prefixes, key=len)]
    if any(marker in ds for marker in _MATH_MARKERS):
        return _VERIFIERS["math"]
    raise ValueError(
        f"no verifier for data_source {data_source!r}; registered: {', '.join(registered_sources())}"
    )


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> float:
    """verl custom reward function: score one response in [0, 1].

    Extra verl kwargs (``sandbox_fusion_url``, ``concurrent_semaphore``, ...) are passed through
    to the verifier, which may ignore them.
    """
    return float(get_verifier(data_source)(solution_str, ground_truth, extra_info, **kwargs))


# Built-in verifiers.  Imported after the registry exists so verifier modules may themselves
# import ``register_verifier`` from this package.
from l2t_verl.scoring import arith as _arith  # noqa: E402
from l2t_verl.scoring import math as _math  # noqa: E402
from l2t_verl.scoring.arith import extract_boxed  # noqa: E402

register_verifier("l2t_arith")(_arith.score)
for _name in MATH_SOURCES:
    register_verifier(_name)(_math.score)

# Unit tests in a sandboxed subprocess for code tasks (HumanEval).
from l2t_verl.scoring import code as _code  # noqa: E402

register_verifier(_code.DATA_SOURCE)(_code.score)

__all__ = [
    "MATH_SOURCES",
    "Verifier",
    "compute_score",
    "extract_boxed",
    "get_verifier",
    "register_verifier",
    "registered_sources",
]
