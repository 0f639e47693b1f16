"""HumanEval-style code verifier: 1.0 iff the response's program passes the task's unit tests.

Registered for data_source ``humaneval`` (see :mod:`l2t_verl.scoring`).  The ground truth carries
what the tests need, as a JSON string (what :mod:`l2t_verl.data_prep` writes) or a mapping::

    {"task_id": "HumanEval/0", "prompt": "def f(x):\\n    \\"\\"\\"...\\"\\"\\"\\n",
     "test": "def check(candidate):\\n    assert candidate(1) == 2\\n", "entry_point": "f"}

The program is taken from the response (:func:`extract_program`), completed against the prompt
(:func:`build_program`), and run with the tests and ``check(<entry_point>)`` in the sandbox of
:mod:`l2t_verl.scoring.sandbox` (time, memory, output and process limits, no network, a throw-away
working directory).  A wrong answer, crash, hang or any misbehaviour scores 0; a malformed ground
truth or a sandbox that cannot start raises, which the reward manager counts as a verifier error
(docs/method.md §8) rather than a wrong answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from l2t_verl.scoring.sandbox import Isolation, SandboxLimits, run_python

DATA_SOURCE = "humaneval"
# Wall clock per response, interpreter start included (~50 ms; more on a loaded machine).  The
# paper's HumanEval protocol uses 1 s for the tests themselves.
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024

_THINK_END = "</think>"
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", ""}
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_ground_truth(ground_truth: Any) -> dict[str, str]:
    """The task as a dict with ``prompt``, ``test`` and ``entry_point``; ``ValueError`` naming the
    key when it is unusable."""
    if isinstance(ground_truth, (str, bytes)):
        try:
            ground_truth = json.loads(ground_truth)
        except ValueError as exc:
            raise ValueError(f"code ground_truth is not valid JSON: {exc}") from None
    if not isinstance(ground_truth, Mapping):
        raise ValueError(f"code ground_truth must be a JSON object, got {type(ground_truth).__name__}")
    test = ground_truth.get("test")
    if not isinstance(test, str) or not test.strip():
        raise ValueError("code ground_truth: key 'test' is missing or empty")
    entry_point = ground_truth.get("entry_point")
    if not isinstance(entry_point, str) or not _IDENTIFIER_RE.fullmatch(entry_point):
        raise ValueError(
            f"code ground_truth: key 'entry_point' must be a Python identifier, got {entry_point!r}"
        )
    prompt = ground_truth.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ValueError("code ground_truth: key 'prompt' must be a string")
    return {"prompt": prompt, "test": test, "entry_point": entry_point}


def extract_program(response: str, entry_point: str | None = None) -> str:
    """The code in a response: the answer part (after the last ``</think>``, if any), then the last
    fenced block that defines ``entry_point``, else the last Python (or untagged) fenced block, else
    the answer text itself.  A fence left open at the end (a truncated response) still counts."""
    if not isinstance(response, str):
        return ""
    answer = response.rsplit(_THINK_END, 1)[-1]
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(answer)]
    if entry_point is not None:
        defining = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for _tag, body in reversed(blocks):
            if defining.search(body):
                return body
    for tag, body in reversed(blocks):
        if tag in _PYTHON_TAGS:
            return body
    if blocks:
        return blocks[-1][1]
    return answer


def build_program(prompt: str, completion: str, entry_point: str) -> str:
    """The source to test.  A completion that defines ``entry_point`` at top level is a whole
    solution: it goes after the prompt, so the prompt's imports and helper functions stay available
    and the new definition replaces the stub (a ``def`` whose body is only a docstring is valid
    Python).  Anything else is a body continuation, appended to the prompt as in the original
    HumanEval protocol."""
    defines = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", completion, re.MULTILINE)
    if defines:
        return f"{prompt}\n\n{completion}" if prompt else completion
    return prompt + completion


def score(
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    isolation: Isolation | None = None,
    **kwargs: Any,
) -> float:
    """1.0 iff the program in ``solution_str`` passes all tests of ``ground_truth``, else 0.0.

    Extra verl kwargs are ignored.  ``timeout_s``/``memory_mb`` default to :data:`DEFAULT_TIMEOUT_S`
    and :data:`DEFAULT_MEMORY_MB`; ``isolation`` exists for tests of the sandbox layers.
    """
    task = parse_ground_truth(ground_truth)
    completion = extract_program(solution_str, task["entry_point"])
    if not completion.strip():
        return 0.0
    program = build_program(task["prompt"], completion, task["entry_point"])
    limits = SandboxLimits(
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s),
        memory_mb=DEFAULT_MEMORY_MB if memory_mb is None else int(memory_mb),
    )
    result = run_python(
        [
            ("<solution>", program),
            ("<tests>", task["test"]),
            ("<check>", f"check({task['entry_point']})\n"),
        ],
        limits=limits,
        isolation=isolation,
    )
    return 1.0 if result.passed else 0.0
