"""The code verifier (HumanEval protocol) and the sandbox behind it.

Every hostile program below runs for real in the sandbox, in this very process's children: the
tests check that it scores 0, within a bounded time, that no process is left behind and that the
calling process (pytest) is still alive afterwards.  The layer tests switch all but one optional
layer off to show that each one holds on its own where the machine supports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from l2t_verl.scoring import code as code_mod
from l2t_verl.scoring import compute_score
from l2t_verl.scoring import sandbox as sandbox_mod
from l2t_verl.scoring.sandbox import Isolation, SandboxError, SandboxLimits, run_python

PROMPT = (
    "from typing import List\n\n\n"
    "def _double(x: int) -> int:\n"
    "    return 2 * x\n\n\n"
    "def sum_doubled(xs: List[int]) -> int:\n"
    '    """Return the sum of twice each element.\n'
    "    >>> sum_doubled([1, 2])\n"
    "    6\n"
    '    """\n'
)
TEST = (
    "METADATA = {}\n\n\n"
    "def check(candidate):\n"
    "    assert candidate([]) == 0\n"
    "    assert candidate([1, 2]) == 6\n"
    "    assert candidate([-3, 5, 10]) == 24\n"
)
TASK = {"task_id": "Toy/0", "prompt": PROMPT, "test": TEST, "entry_point": "sum_doubled"}
GT = json.dumps(TASK)
CORRECT = "def sum_doubled(xs):\n    return sum(_double(x) for x in xs)\n"
WRONG = "def sum_doubled(xs):\n    return sum(xs)\n"

HOSTILE_TIMEOUT_S = 1.5
# For programs that end by themselves: generous, so that a loaded machine cannot turn a "failed"
# into a "timeout".
QUICK_TIMEOUT_S = 15.0
# Generous bound for "ended by the limit, not hung": interpreter start-up on a loaded 2-core CI box
# plus the cleanup.
BOUND_S = HOSTILE_TIMEOUT_S + 8.0
ONLY_SECCOMP = Isolation(seccomp=True, namespaces=False, drop_privileges=False, python_guard=False)
ONLY_GUARD = Isolation(seccomp=False, namespaces=False, drop_privileges=False, python_guard=True)
ONLY_NAMESPACES = Isolation(seccomp=False, namespaces=True, drop_privileges=False, python_guard=False)
NO_OPTIONAL_LAYER = Isolation(seccomp=False, namespaces=False, drop_privileges=False, python_guard=False)


def fenced(code: str) -> str:
    return f"<think>\nLet me write it.\n</think>\nHere it is:\n```python\n{code}```\n"


def sandbox_processes() -> list[int]:
    """Live processes started by the sandbox (forks inherit the marker in their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        if sandbox_mod.SANDBOX_MARKER.encode() in cmdline and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    assert sandbox_processes() == [], "sandbox processes alive before the test"
    pid = os.getpid()
    yield
    assert os.getpid() == pid
    assert sandbox_processes() == [], "sandbox processes left behind"


def layers_available() -> dict[str, bool]:
    return run_python([("<probe>", "pass")]).layers


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("reasoning ```python\nx = 0\n``` more</think>\n```python\nx = 2\n```", "x = 2\n"),
        ("```\nuntagged = 1\n```", "untagged = 1\n"),
        ("```python\nfirst = 1\n```\ntext\n```py\nsecond = 2\n```", "second = 2\n"),
        ("<think>no code here</think>\n    return 3\n", "\n    return 3\n"),
        ("```python\ntruncated = 1\n", "truncated = 1\n"),
        ("```text\nnot code\n```", "not code\n"),
    ],
)
def test_extract_program(response: str, expected: str) -> None:
    assert code_mod.extract_program(response) == expected


def test_extract_prefers_block_defining_entry_point() -> None:
    response = "```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(1))\n```"
    assert code_mod.extract_program(response, "f").startswith("def f(x)")
    assert code_mod.extract_program(response).startswith("print")


def test_build_program_whole_function_vs_continuation() -> None:
    whole = code_mod.build_program(PROMPT, CORRECT, "sum_doubled")
    assert whole.startswith(PROMPT) and whole.endswith(CORRECT)
    body = "    return 0\n"
    assert code_mod.build_program(PROMPT, body, "sum_doubled") == PROMPT + body
    # A nested helper with the same name is not a top-level definition.
    nested = "    def sum_doubled(x):\n        return x\n    return 0\n"
    assert code_mod.build_program(PROMPT, nested, "sum_doubled") == PROMPT + nested


@pytest.mark.parametrize(
    ("ground_truth", "key"),
    [
        ("not json", "JSON"),
        (json.dumps({"prompt": PROMPT, "entry_point": "f"}), "'test'"),
        (json.dumps({"prompt": PROMPT, "test": TEST, "entry_point": "f(x)"}), "'entry_point'"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_malformed_ground_truth_raises_naming_the_key(ground_truth: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        code_mod.score(fenced(CORRECT), ground_truth)


# ----------------------------------------------------------------------------- honest programs


def test_correct_solution_scores_one() -> None:
    assert code_mod.score(fenced(CORRECT), GT) == 1.0
    assert code_mod.score(fenced(CORRECT), TASK) == 1.0  # a mapping works too


def test_wrong_solution_scores_zero() -> None:
    assert code_mod.score(fenced(WRONG), GT) == 0.0


def test_body_continuation_scores_like_original_humaneval() -> None:
    assert code_mod.score("    return sum(_double(x) for x in xs)\n", GT) == 1.0
    assert code_mod.score("    return 0\n", GT) == 0.0


def test_syntax_error_and_empty_response_score_zero() -> None:
    assert code_mod.score(fenced("def sum_doubled(xs) return 1\n"), GT) == 0.0
    assert code_mod.score("", GT) == 0.0
    assert code_mod.score("<think>only thinking</think>", GT) == 0.0


def test_main_guard_of_solution_does_not_run() -> None:
    program = CORRECT + "if __name__ == '__main__':\n    raise SystemExit(input())\n"
    assert code_mod.score(fenced(program), GT) == 1.0


def test_through_compute_score() -> None:
    assert compute_score("humaneval", fenced(CORRECT), GT) == 1.0
    assert compute_score("humaneval", fenced(WRONG), GT) == 0.0
    assert (
        compute_score("humaneval", fenced("import os\nos._exit(0)\n"), GT, timeout_s=HOSTILE_TIMEOUT_S) == 0.0
    )


def test_concurrent_calls_from_threads() -> None:
    # verl's reward loop calls the verifier from a thread pool.
    responses = [
        fenced(CORRECT),
        fenced(WRONG),
        "    return sum(_double(x) for x in xs)\n",
        "    return -1\n",
    ] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(lambda r: compute_score("humaneval", r, GT), responses))
    assert scores == [1.0, 0.0, 1.0, 0.0] * 2


def test_writes_inside_working_dir_are_allowed() -> None:
    program = (
        "import tempfile, os\n"
        "with open('scratch.txt', 'w') as f:\n    f.write('ok')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\n"
        "os.remove('scratch.txt')\n" + CORRECT
    )
    assert code_mod.score(fenced(program), GT) == 1.0


# ----------------------------------------------------------------------------- hostile programs

HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "infinite_output": "while True:\n    print('x' * 4096)\n",
    "memory_bomb_at_once": "x = bytearray(50 * 1024**3)\n",
    "memory_bomb_gradual": "keep = []\nwhile True:\n    keep.append(bytearray(16 * 1024**2))\n",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "os_exit_before_tests": "import os\nos._exit(0)\n",
    "sys_exit_before_tests": "import sys\nsys.exit(0)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_own_group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "kill_everyone": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "crash": "import faulthandler\nfaulthandler._sigsegv()\n",
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
    "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
    "ctypes": "import ctypes\nctypes.CDLL(None).fork()\n",
    "recursion": "def f():\n    return f()\nf()\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero(name: str) -> None:
    # Each hostile snippet sits in front of a correct solution, so only the snippet can make it fail.
    program = HOSTILE[name] + CORRECT
    start = time.monotonic()
    score = compute_score("humaneval", fenced(program), GT, timeout_s=HOSTILE_TIMEOUT_S, memory_mb=256)
    elapsed = time.monotonic() - start
    assert score == 0.0
    assert elapsed < BOUND_S, f"{name} took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("infinite_loop", "timeout"),
        ("infinite_output", "failed"),  # the file-size limit, not the clock, stops it
        ("memory_bomb_at_once", "failed"),
        ("memory_bomb_gradual", "failed"),
        ("os_exit_before_tests", "failed"),
        ("sys_exit_before_tests", "failed"),
    ],
)
def test_limits_stop_misbehaviour_for_the_right_reason(name: str, status: str) -> None:
    # With no optional layer at all: these limits are the always-on ones.
    result = run_python(
        [("<solution>", HOSTILE[name] + CORRECT), ("<tests>", TEST), ("<check>", "check(sum_doubled)")],
        limits=SandboxLimits(
            timeout_s=HOSTILE_TIMEOUT_S if status == "timeout" else QUICK_TIMEOUT_S,
            max_output_bytes=1 << 16,
            memory_mb=256,
        ),
        isolation=NO_OPTIONAL_LAYER,
    )
    assert not result.passed
    assert result.status == status, result
    assert result.elapsed_s < BOUND_S


def test_output_is_capped() -> None:
    result = run_python(
        [("<solution>", HOSTILE["infinite_output"])],
        limits=SandboxLimits(timeout_s=QUICK_TIMEOUT_S, max_output_bytes=1 << 16),
    )
    assert result.status == "failed"
    assert "File too large" in result.stderr or "EFBIG" in result.stderr or "Errno 27" in result.stderr
    assert 0 < len(result.stdout) <= sandbox_mod._TAIL_BYTES


def test_writes_outside_the_working_dir_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "created.txt"
    for snippet in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.remove({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
    ):
        assert code_mod.score(fenced(snippet + CORRECT), GT) == 0.0
    assert victim.read_text() == "keep me"
    assert not target.exists()


# ----------------------------------------------------------------------------- each layer alone


def _run_alone(source: str, isolation: Isolation, timeout_s: float = QUICK_TIMEOUT_S):
    return run_python([("<solution>", source)], SandboxLimits(timeout_s=timeout_s), isolation)


def test_seccomp_alone_blocks_processes_signals_and_sockets() -> None:
    if not _run_alone("pass", ONLY_SECCOMP).layers["seccomp"]:
        pytest.skip("no seccomp filter for this architecture")
    for source in (
        "import os\nos.fork()\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "import socket\nsocket.socket()\n",
        "import os\nos.execv('/bin/true', ['true'])\n",
    ):
        result = _run_alone(source, ONLY_SECCOMP)
        assert result.status == "failed"
        assert "Operation not permitted" in result.stderr, result
    # Threads are still allowed: clone with CLONE_THREAD passes the filter.
    threads = "import threading\nt = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
    assert _run_alone(threads, ONLY_SECCOMP).passed
    assert _run_alone(HOSTILE["fork_bomb"], ONLY_SECCOMP, HOSTILE_TIMEOUT_S).status == "timeout"


def test_python_guard_alone_blocks_processes_signals_sockets_and_ctypes() -> None:
    for source, event in (
        ("import os\nos.fork()\n", "os.fork"),
        ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "os.kill"),
        ("import socket\nsocket.socket()\n", "socket"),
        ("import subprocess\nsubprocess.run(['true'])\n", "_posixsubprocess"),
        ("import ctypes\n", "ctypes"),
    ):
        result = _run_alone(source, ONLY_GUARD)
        assert result.status == "failed"
        assert event in result.stderr, result
    assert _run_alone(HOSTILE["fork_bomb"], ONLY_GUARD, HOSTILE_TIMEOUT_S).status == "timeout"


def test_namespaces_alone_isolate_network_and_parent() -> None:
    if not _run_alone("pass", ONLY_NAMESPACES).layers["namespaces"]:
        pytest.skip("unshare cannot create namespaces here")
    net = _run_alone("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n", ONLY_NAMESPACES)
    assert net.status == "failed" and "unreachable" in net.stderr.lower(), net
    # The program's parent is the sandbox's own init (pid 1 of the new namespace), which ignores a
    # SIGKILL from inside; the caller is not even visible.
    assert _run_alone("import os\nassert os.getpid() == 2 and os.getppid() == 1\n", ONLY_NAMESPACES).passed
    kill = _run_alone("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", ONLY_NAMESPACES)
    assert kill.layers["namespaces"] and kill.status in ("passed", "failed")


SPAWN_ESCAPING_SLEEPERS = (
    "import os, time\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"  # leave the process group ...
    "        if os.fork() == 0:\n"
    "            time.sleep(120)\n"
    "        os._exit(0)\n"  # ... and orphan the grandchild
)


@pytest.mark.parametrize(
    "isolation", [NO_OPTIONAL_LAYER, ONLY_NAMESPACES], ids=["tree_walk", "pid_namespace"]
)
@pytest.mark.parametrize(("then", "status"), [("time.sleep(120)\n", "timeout"), ("pass\n", "passed")])
def test_escaped_descendants_are_killed(isolation: Isolation, then: str, status: str) -> None:
    # Only harmless sleepers: with every optional layer off nothing would stop a real fork bomb for
    # root (RLIMIT_NPROC does not apply to root), which is what seccomp is for.  If the program
    # hangs, the caller kills the tree at the deadline; if it returns at once, the sandbox's own
    # supervisor (or the PID namespace) must still kill the orphans it left.
    result = _run_alone(
        SPAWN_ESCAPING_SLEEPERS + then,
        isolation,
        HOSTILE_TIMEOUT_S if status == "timeout" else QUICK_TIMEOUT_S,
    )
    assert result.status == status
    # The autouse fixture asserts that none of the sleepers survived.


def _world_executable(path: str) -> bool:
    """Whether a user other than the owner can execute ``path`` (every directory on the way too)."""
    real = Path(path).resolve()
    if not real.is_file() or not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


@pytest.fixture
def other_user_python() -> str:
    """An interpreter that a fresh unprivileged uid can run, for the privilege-drop layer (the
    project's own may live under /root, mode 700, as on the development machine)."""
    if os.geteuid() != 0:
        pytest.skip("only root drops privileges")
    for candidate in (sandbox_mod.sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(candidate):
            support = sandbox_mod._support(candidate)
            if support.drop_plain and support.drop_in_namespace:
                return candidate
    pytest.skip("no interpreter here that an unprivileged uid may execute")


def test_privilege_drop_runs_as_a_fresh_uid(other_user_python: str) -> None:
    check = "import os\nassert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() == []\n"
    uids = set()
    for isolation in (Isolation(), Isolation(namespaces=False)):
        result = run_python(
            [("<solution>", check + "print(os.getuid())\n")], isolation=isolation, python=other_user_python
        )
        assert result.passed and result.layers["own_uid"], result
        uids.add(int(result.stdout))
    assert len(uids) == 2  # a new uid per run


def test_nproc_limit_stops_a_real_fork_bomb_under_own_uid(other_user_python: str) -> None:
    # seccomp and the audit hook off: only RLIMIT_NPROC, which the kernel enforces for the fresh
    # uid, stands between this fork bomb and the machine.
    bomb = (
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "        n += 1\n"
        "    except OSError as exc:\n"
        "        print(n)\n"
        "        raise SystemExit(1)\n"
    )
    limits = SandboxLimits(timeout_s=QUICK_TIMEOUT_S, max_processes=8)
    for isolation in (NO_OPTIONAL_LAYER, ONLY_NAMESPACES):
        own_uid = dataclasses.replace(isolation, drop_privileges=True)
        result = run_python([("<solution>", bomb)], limits, own_uid, python=other_user_python)
        assert result.layers["own_uid"]
        assert result.status == "failed", result  # stopped by the limit, not the clock
        assert 0 < int(result.stdout) < 8
        # The autouse fixture asserts that the sleeping children were all killed.


def test_own_uid_cannot_touch_the_callers_process_or_files(other_user_python: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    own_uid_only = Isolation(seccomp=False, namespaces=False, drop_privileges=True, python_guard=False)
    for source in (f"import os\nos.kill({os.getpid()}, 0)\n", f"open({str(victim)!r}, 'w')\n"):
        result = run_python([("<solution>", source)], isolation=own_uid_only, python=other_user_python)
        assert result.layers["own_uid"]
        assert result.status == "failed" and "Permission" in result.stderr, result
    assert victim.read_text() == "keep me"


def test_sandbox_error_when_child_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # An interpreter that exits at once never reports ready: an infrastructure error (counted as a
    # verifier error upstream), not a wrong answer.
    monkeypatch.setattr(sandbox_mod.sys, "executable", "/bin/false")
    with pytest.raises(SandboxError, match="never got ready"):
        run_python([("<solution>", "pass")])
    monkeypatch.setattr(sandbox_mod.sys, "executable", "/nonexistent/python")
    with pytest.raises(SandboxError, match="cannot start"):
        run_python([("<solution>", "pass")])
