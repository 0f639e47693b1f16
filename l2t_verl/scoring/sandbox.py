"""Run untrusted Python (model-written code plus its unit tests) in a separate, limited process.

:func:`run_python` executes source segments one after another in one fresh namespace inside a child
``python -I -S -B`` (isolated mode, standard library only, no bytecode writes) and reports whether
all of them ran without raising.  Nothing the program does can take the calling process down: it
never runs in it.

Layers, each used when the machine supports it (:attr:`SandboxResult.layers` says which were on):

1. Always: a fresh temporary working directory (deleted afterwards), a scrubbed environment, a new
   session, a wall-clock limit; rlimits on address space (memory), CPU seconds, file size (this caps
   stdout/stderr, which go to files), open files and core dumps.  The child is a small supervisor
   that forks a worker for the program (so the program is never a PID namespace's init, which
   would ignore even its own fatal signals), is a *subreaper* (orphans of a double fork come back
   to it) and kills whatever the worker left behind before exiting.  On return the caller stops,
   then kills, the process group and every process found below the child in ``/proc``.
2. seccomp filter (x86_64 and aarch64, kernel-enforced, root included): no fork/vfork/exec (clone
   only for threads), no signals to other processes, no sockets, no namespace or mount changes, no
   ptrace or cross-process memory access, no io_uring.  This is the fork-bomb and kill-the-parent
   defence that also holds for root, for whom ``RLIMIT_NPROC`` does nothing.
3. Linux namespaces through ``unshare`` (util-linux) when it works here: a new PID namespace (all of
   the program's processes die with its init; ``kill(-1)`` and ``getppid()`` cannot reach out) and
   a new network namespace (only a loopback that is down).  Unprivileged callers add a user
   namespace.
4. As root: the program runs under a fresh unprivileged uid/gid per run (so ``RLIMIT_NPROC``
   applies, and it cannot signal or write root's processes and files), provided that uid may
   execute the interpreter; a Python under ``/root`` (mode 700) cannot be, and then this layer is
   off.
5. A Python audit hook: no process creation, signals, sockets or ``ctypes``, and no file writes
   outside the working directory.  It stops pure-Python code only; native code could bypass it,
   which is why loading ``ctypes`` is refused and why layers 2-4 exist.

Guaranteed where the layer is on: bounded wall time, memory, CPU and output; no processes left
behind; the caller cannot be signalled; no network (namespace or seccomp, either suffices).
Not guaranteed: confidentiality of files the sandbox user can read; total disk use (the file-size
limit is per file, within the wall-clock limit); CPU contention from threads.  Running as root
without layer 4, files outside the working directory are protected by layer 5 alone; on an
architecture without seccomp, a fork bomb by root is stopped by layer 5 alone (layer 3 only bounds
its lifetime).  With layers 2 to 5 all off (which only tests do), a program could kill its
supervisor and leave setsid'd orphans behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# The marker lets a process listing (and the tests) recognise sandbox processes: forks inherit it.
SANDBOX_MARKER = "l2t-sandbox"
BOOTSTRAP = (
    f"# {SANDBOX_MARKER}\n"
    "import sys, json\n"
    "J = json.loads(sys.stdin.buffer.readline())\n"
    "G = {'__name__': '__l2t_sandbox__', 'JOB': J}\n"
    "exec(compile(J.pop('runner'), '<l2t-sandbox-runner>', 'exec'), G)\n"
)
_RUNNER_PATH = Path(__file__).with_name("_sandbox_runner.py")
# Per-run uids for the privilege drop: far above any real account, and unique per run so that
# concurrent sandboxes neither share an RLIMIT_NPROC count nor can signal each other.
_UID_RANGE = (2_000_000_000, 2_100_000_000)
_TAIL_BYTES = 4096
_PROBE_TIMEOUT_S = 20.0


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start the child, or the child never got ready): a
    verifier error, not a wrong answer."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run.  ``max_processes`` (RLIMIT_NPROC) is applied only when the run
    has its own uid (layer 4): the kernel counts processes per uid and exempts root."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_processes: int = 16
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_output_bytes", "max_processes", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Isolation:
    """Which optional layers to request (all by default).  Switching one off exists for tests that
    check each remaining layer on its own; production code should keep the defaults."""

    seccomp: bool = True
    namespaces: bool = True
    drop_privileges: bool = True
    python_guard: bool = True


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    elapsed_s: float
    stdout: str = ""  # the last few KiB
    stderr: str = ""
    layers: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class _Support:
    unshare: str | None  # path of a working ``unshare``, or None
    drop_plain: bool  # root only: a fresh uid can run the interpreter (no namespaces)
    drop_in_namespace: bool  # the same through ``unshare --setuid``


_support_cache: dict[str, _Support] = {}
_support_lock = threading.Lock()
_runner_source: str | None = None
_warned_no_seccomp: list[bool] = []  # a flag that needs no ``global`` statement


def _runner() -> str:
    global _runner_source
    if _runner_source is None:
        _runner_source = _RUNNER_PATH.read_text()
    return _runner_source


def _namespace_prefix(unshare: str, uid: int | None) -> list[str]:
    cmd = [unshare, "--fork", "--kill-child", "--pid", "--net"]
    if os.geteuid() != 0:
        cmd += ["--user", "--map-root-user"]
    if uid is not None:
        cmd += ["--setuid", str(uid), "--setgid", str(uid)]
    return cmd + ["--"]


def _probe(cmd: list[str], **kwargs: object) -> bool:
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            timeout=_PROBE_TIMEOUT_S,
            start_new_session=True,
            **kwargs,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _support(python: str) -> _Support:
    """What this machine allows, found once per interpreter by running ``python -c pass`` each way."""
    with _support_lock:
        if python in _support_cache:
            return _support_cache[python]
        trivial = [python, "-I", "-S", "-c", "pass"]
        unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
        if unshare is not None and not _probe(_namespace_prefix(unshare, None) + trivial):
            unshare = None
        drop_plain = drop_ns = False
        if os.geteuid() == 0 and hasattr(os, "setgroups"):
            uid = _UID_RANGE[0]
            drop_plain = _probe(trivial, user=uid, group=uid, extra_groups=[])
            if unshare is not None:
                drop_ns = _probe(_namespace_prefix(unshare, uid) + trivial)
        support = _Support(unshare, drop_plain, drop_ns)
        if unshare is None:
            logger.warning("code sandbox: no PID/network namespaces on this machine (unshare unavailable)")
        if os.geteuid() == 0 and not (drop_plain or drop_ns):
            logger.warning(
                "code sandbox: running as root and an unprivileged uid cannot execute %s; "
                "programs run as root (seccomp and the audit hook still apply; set "
                "L2T_SANDBOX_PYTHON to an interpreter others may run, e.g. /usr/bin/python3)",
                python,
            )
        _support_cache[python] = support
        return support


# ------------------------------------------------------------------------------ process cleanup


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, uid) for every process visible in /proc (empty where there is none)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue  # exited meanwhile
        # The command name may contain spaces and parentheses: fields resume after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]), uid)
    return table


def _sandbox_pids(leader: int, uid: int | None) -> set[int]:
    """The leader's process group (= its session), every process of the per-run uid if there is
    one, and all descendants of these, the leader excluded."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgid, _uid) in table.items():
        children.setdefault(ppid, []).append(pid)
    roots = {
        pid
        for pid, (_ppid, pgid, puid) in table.items()
        if pgid == leader or (uid is not None and puid == uid)
    }
    found = set(roots)
    stack = [leader, *roots]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(leader)
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_everything(leader: int, uid: int | None) -> None:
    """Freeze the whole tree first (a stopped process cannot fork, and as long as the subreaper is
    stopped rather than dead no orphan escapes to init), then kill it."""
    try:
        os.killpg(leader, signal.SIGSTOP)
    except (ProcessLookupError, PermissionError):
        pass
    _signal({leader}, signal.SIGSTOP)
    frozen: set[int] = set()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        current = _sandbox_pids(leader, uid)
        new = current - frozen
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        frozen |= current
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(frozen | {leader}, signal.SIGKILL)
    # Killed processes vanish from /proc once reaped; wait briefly so that callers (and tests)
    # observe a clean state.
    while time.monotonic() < deadline:
        alive = [pid for pid in _sandbox_pids(leader, uid) if not _is_zombie(pid)]
        if not alive:
            return
        _signal(set(alive), signal.SIGKILL)
        time.sleep(0.005)
    logger.warning("code sandbox: processes of run %d still alive after cleanup", leader)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # gone
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


# ------------------------------------------------------------------------------ running


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
    os.set_blocking(fd, False)
    chunks, total = [], 0
    while total < limit:
        try:
            chunk = os.read(fd, limit - total)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def run_python(
    segments: Sequence[tuple[str, str]],
    limits: SandboxLimits | None = None,
    isolation: Isolation | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run ``segments`` (``(filename, source)`` pairs, e.g. solution, tests, ``check(...)``) in order
    in one namespace in a sandboxed child; ``passed`` iff none of them raised (``SystemExit``
    included) and the child was not killed.  Raises :class:`SandboxError` if the child could not be
    started or never got ready; a program that misbehaves is a ``failed``/``timeout`` result.

    ``python`` (default: ``$L2T_SANDBOX_PYTHON``, else ``sys.executable``) is the interpreter of the
    child; only its standard library is used.  As root, point it at an interpreter that other users
    may execute (e.g. ``/usr/bin/python3``) when the project's own cannot be, to get layer 4."""
    limits = limits or SandboxLimits()
    isolation = isolation or Isolation()
    python = python or os.environ.get("L2T_SANDBOX_PYTHON") or sys.executable
    if not python:
        raise SandboxError("sys.executable is empty: no interpreter to run the sandbox with")
    support = _support(python)
    use_namespaces = isolation.namespaces and support.unshare is not None
    drop = isolation.drop_privileges and (support.drop_in_namespace if use_namespaces else support.drop_plain)
    uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if drop else None

    workdir = Path(tempfile.mkdtemp(prefix=f"{SANDBOX_MARKER}-"))
    read_fd, write_fd = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        cmd = [python, "-I", "-S", "-B", "-c", BOOTSTRAP]
        popen_extra: dict[str, object] = {}
        if use_namespaces:
            cmd = _namespace_prefix(support.unshare, uid) + cmd
        elif uid is not None:
            popen_extra = {"user": uid, "group": uid, "extra_groups": []}
        nonce = secrets.token_hex(16)
        job = {
            "runner": _runner(),
            "segments": [list(s) for s in segments],
            "nonce": nonce,
            "verdict_fd": write_fd,
            "memory_bytes": limits.memory_mb << 20,
            "cpu_seconds": math.ceil(limits.timeout_s) + 1,
            "max_output_bytes": limits.max_output_bytes,
            "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes if uid is not None else None,
            "seccomp": isolation.seccomp,
            "python_guard": isolation.python_guard,
            "pid_namespace": use_namespaces,
        }
        env = {
            "PATH": os.defpath,
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }
        stdout_path, stderr_path = workdir / "stdout.txt", workdir / "stderr.txt"
        start = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    pass_fds=(write_fd,),
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                    **popen_extra,
                )
            except OSError as exc:
                raise SandboxError(f"cannot start the sandbox ({cmd[0]}): {exc}") from exc
            finally:
                os.close(write_fd)
                write_fd = -1
        timed_out = False
        try:
            proc.communicate(input=json.dumps(job).encode() + b"\n", timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_everything(proc.pid, uid)
            proc.wait()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:  # the child may have died with input still unread
                    pass
        elapsed = time.monotonic() - start
        lines = _read_available(read_fd).split(b"\n")
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        shutil.rmtree(workdir, ignore_errors=True)

    ready = lines[0].decode(errors="replace").split() if lines[0].startswith(b"READY") else None
    if ready is None:
        raise SandboxError(
            f"sandbox child never got ready (exit {proc.returncode}, "
            f"{'timed out, ' if timed_out else ''}stderr: {stderr.strip()[-500:]!r})"
        )
    flags = dict(item.split("=", 1) for item in ready[1:])
    layers = {
        "seccomp": flags.get("seccomp") == "1",
        "python_guard": flags.get("guard") == "1",
        "namespaces": use_namespaces,
        "own_uid": uid is not None,
    }
    if isolation.seccomp and not layers["seccomp"] and not _warned_no_seccomp:
        _warned_no_seccomp.append(True)
        logger.warning("code sandbox: no seccomp filter for this machine (%s)", os.uname().machine)
    passed = not timed_out and nonce.encode() in lines[1:]
    status = "passed" if passed else ("timeout" if timed_out else "failed")
    return SandboxResult(passed, status, proc.returncode, elapsed, stdout, stderr, layers)
