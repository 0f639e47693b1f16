"""Child side of :mod:`l2t_verl.scoring.sandbox`: runs untrusted code inside ``python -I -S``.

Not imported by the package.  The parent sends this file's source and a JSON job on one stdin line;
a tiny bootstrap (``sandbox.BOOTSTRAP``) executes it with ``__name__ == "__l2t_sandbox__"`` and the
job in the global ``JOB``.  Only the standard library is available here (``-S``), and nothing may
import ``l2t_verl``: the sandbox user may not even be able to read the repository.

This process forks a worker for the program and supervises it. In the worker, order matters:
resource limits, then the seccomp filter (needs ``ctypes``), then the Python audit
hook (which forbids ``ctypes`` from then on), then a ready line on the verdict pipe, then the
program.  The verdict pipe receives the job's nonce only after every segment ran without raising,
so exiting early (``sys.exit(0)``, ``os._exit(0)``), crashing or being killed can never read as a
pass.  A program that deliberately tampers with the interpreter it runs in (walking frames to find
the nonce, objects whose ``__eq__`` is always true) can still forge a pass: no in-process test
harness prevents that, and the sandbox only promises that the program cannot harm the host.
"""

from __future__ import annotations

import builtins
import os
import resource
import signal
import struct
import sys
import time

VERDICT_FD = 3

# seccomp / BPF constants (linux/seccomp.h, linux/filter.h, linux/audit.h).
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_PR_SET_CHILD_SUBREAPER = 36
_SECCOMP_MODE_FILTER = 2
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JSET_K = 0x45
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_EPERM = 0x00050000 | 1
_RET_ENOSYS = 0x00050000 | 38
_CLONE_THREAD = 0x00010000
# Offsets into struct seccomp_data: nr, arch, instruction_pointer, args[6] (little endian).
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16

# Per architecture: audit arch, syscalls denied outright (EPERM), and the ones needing an argument
# check.  Denied: process creation (fork/vfork/exec; clone only for threads), signals to other
# processes, sockets, namespace/mount changes (a root sandbox could otherwise setns() back into the
# host network), ptrace and cross-process memory access, io_uring (which bypasses seccomp).
_ARCHES = {
    "x86_64": {
        "audit": 0xC000003E,
        "deny": {
            "fork": 57,
            "vfork": 58,
            "execve": 59,
            "execveat": 322,
            "socket": 41,
            "tkill": 200,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "rt_sigqueueinfo": 129,
            "rt_tgsigqueueinfo": 297,
            "pidfd_send_signal": 424,
            "io_uring_setup": 425,
            "setns": 308,
            "unshare": 272,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "chroot": 161,
        },  # fmt: skip
        "clone": 56,
        "clone3": 435,
        "kill": 62,
        "tgkill": 234,
        # The x32 ABI reuses the x86_64 arch value with this bit set in the syscall number.
        "x32_bit": 0x40000000,
    },  # fmt: skip
    "aarch64": {
        "audit": 0xC00000B7,
        "deny": {
            "execve": 221,
            "execveat": 281,
            "socket": 198,
            "tkill": 130,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "rt_sigqueueinfo": 138,
            "rt_tgsigqueueinfo": 240,
            "pidfd_send_signal": 424,
            "io_uring_setup": 425,
            "setns": 268,
            "unshare": 97,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "chroot": 51,
        },  # fmt: skip
        "clone": 220,
        "clone3": 435,
        "kill": 129,
        "tgkill": 131,
        "x32_bit": None,
    },  # fmt: skip
}


def _set_limits(job: dict) -> None:
    limits = {
        "RLIMIT_AS": job["memory_bytes"],
        "RLIMIT_CPU": job["cpu_seconds"],
        "RLIMIT_FSIZE": job["max_output_bytes"],
        "RLIMIT_NOFILE": job["max_open_files"],
        "RLIMIT_CORE": 0,
        # Only sent when the sandbox runs as its own fresh uid: the kernel counts processes per
        # uid and ignores the limit for root, so anywhere else it would be wrong or void.
        "RLIMIT_NPROC": job["max_processes"],
    }
    for name, value in limits.items():
        res = getattr(resource, name, None)
        if res is None or value is None:
            continue
        _soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def _bpf_program(arch: dict, own_pid: int) -> bytes:
    """Assemble the seccomp filter; jump targets are labels resolved in a second pass."""
    code: list[tuple[int, object, object, int]] = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 0, "kill", arch["audit"]),
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch["x32_bit"] is not None:
        code.append((_BPF_JGE_K, "deny", 0, arch["x32_bit"]))
    for nr in sorted(arch["deny"].values()):
        code.append((_BPF_JEQ_K, "deny", 0, nr))
    code += [
        (_BPF_JEQ_K, "clone", 0, arch["clone"]),
        # clone3 passes its flags in memory that BPF cannot read: ENOSYS makes glibc fall back to clone.
        (_BPF_JEQ_K, "enosys", 0, arch["clone3"]),
        (_BPF_JEQ_K, "own_pid", 0, arch["kill"]),
        (_BPF_JEQ_K, "own_pid", 0, arch["tgkill"]),
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    labels = {"clone": len(code)}
    code += [(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0_LO), (_BPF_JSET_K, "allow", "deny", _CLONE_THREAD)]
    labels["own_pid"] = len(code)
    code += [(_BPF_LD_W_ABS, 0, 0, _OFF_ARG0_LO), (_BPF_JEQ_K, "allow", "deny", own_pid)]
    for name, ret in (("allow", _RET_ALLOW), ("deny", _RET_EPERM), ("enosys", _RET_ENOSYS)):
        labels[name] = len(code)
        code.append((_BPF_RET_K, 0, 0, ret))
    labels["kill"] = len(code)
    code.append((_BPF_RET_K, 0, 0, _RET_KILL_PROCESS))

    out = []
    for i, (op, jt, jf, k) in enumerate(code):
        jumps = [labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
        out.append(struct.pack("=HBBI", op, jumps[0], jumps[1], k))
    return b"".join(out)


def _become_subreaper() -> None:
    """Orphans of the program are re-parented to us instead of init, so they stay findable."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: the caller's process-group kill remains
        pass


def _install_seccomp() -> bool:
    """Install the seccomp filter if the architecture is known; return whether it is on."""
    import ctypes

    arch = _ARCHES.get(os.uname().machine)
    if arch is None:
        return False

    class _SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    program = _bpf_program(arch, os.getpid())
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


_PROCESS_EVENTS = frozenset(
    {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
    }
)  # fmt: skip
# Filesystem-changing audit events: which arguments are paths it changes, and which are dir_fd
# (CPython passes -1 for "no dir_fd").  Relative paths resolve against the cwd, so only a real
# dir_fd makes a path unresolvable here.
_WRITE_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.mkdir": ((0,), (2,)),
    "os.symlink": ((1,), (2,)), "os.link": ((0, 1), (2, 3)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), ()),
    "shutil.move": ((0, 1), ()), "shutil.copyfile": ((1,), ()), "shutil.copytree": ((1,), ()),
}  # fmt: skip
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_guard(workdir: str) -> None:
    """Python-level second line behind seccomp: no processes, sockets, native code or writes outside
    ``workdir``.  Audit hooks cannot be removed from Python; native code could bypass them, which is
    why loading ``ctypes`` is refused."""
    root = os.path.realpath(workdir)
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep

    def inside(path: object) -> bool:
        try:
            resolved = realpath(fspath(path))
        except (TypeError, ValueError):
            return False
        if isinstance(resolved, bytes):
            resolved = os.fsdecode(resolved)
        return resolved == root or resolved.startswith(root + sep) or resolved == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event in _PROCESS_EVENTS or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in _BLOCKED_MODULES:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+")
            )
            # An int path is an already-open descriptor (os.fdopen): nothing new is reached.
            if writing and not isinstance(path, int) and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed")
        elif event in _WRITE_EVENTS:
            path_positions, dir_fd_positions = _WRITE_EVENTS[event]
            if any(i < len(args) and args[i] not in (None, -1) for i in dir_fd_positions):
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
            for i in path_positions:
                if i >= len(args):
                    continue
                # Descriptors (fchmod, fchown, ...) could refer to a file opened read-only outside.
                if isinstance(args[i], int) and event != "os.truncate":
                    raise PermissionError(f"sandbox: {event} on a descriptor is not allowed")
                if not isinstance(args[i], int) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} is not allowed")

    sys.addaudithook(hook)
    for name in list(sys.modules):
        if name.split(".")[0] in _BLOCKED_MODULES:
            del sys.modules[name]  # so that a later import goes through the hook again


def _work(job: dict) -> None:
    """The worker process: limits, filters, then the program.  Never returns."""
    write, exit_now = os.write, os._exit  # bound early: the program may monkeypatch ``os``
    nonce = job.pop("nonce").encode()  # popped: the bootstrap's globals hold the same dict
    segments = job["segments"]
    _set_limits(job)
    seccomp_on = job["seccomp"] and _install_seccomp()
    if job["python_guard"]:
        _install_guard(os.getcwd())
    write(VERDICT_FD, f"READY seccomp={int(seccomp_on)} guard={int(job['python_guard'])}\n".encode())

    # Not "__main__": a solution's own ``if __name__ == "__main__":`` demo must not run.
    namespace: dict = {"__name__": "__solution__", "__builtins__": builtins}
    del job
    passed = False
    try:
        for filename, source in segments:
            exec(compile(source, filename, "exec"), namespace)
        passed = True
    except BaseException as exc:  # SystemExit included: leaving before the tests ran is a failure
        try:
            sys.__stderr__.write(f"sandbox: {type(exc).__name__}: {str(exc)[:1000]}\n")
        except BaseException:  # a hostile __str__ must not turn a failure into anything else
            pass
    if passed:
        write(VERDICT_FD, nonce + b"\n")
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    exit_now(0)


def _descendants() -> set[int]:
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    stack = [os.getpid()]
    while stack:
        for child in parents.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _kill_descendants() -> None:
    """Kill whatever the program left behind until nothing is left.  We are the subreaper, so the
    orphans of every killed process come back to us and the next pass finds them.  (Inside a PID
    namespace the kernel does all this when we, its init, exit.)"""
    for _ in range(1000):
        pids = _descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:  # reap, so that the killed leave /proc
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.001)


def main(job: dict) -> None:
    """Supervisor: the program runs in a forked worker, never as this process.  Inside a PID
    namespace this process is init, which ignores signals it has no handler for (even a program's
    own ``raise(SIGSEGV)``), and it must outlive the program to reap its orphans."""
    if job["verdict_fd"] != VERDICT_FD:
        os.dup2(job["verdict_fd"], VERDICT_FD)
        os.close(job["verdict_fd"])
    _become_subreaper()
    worker = os.fork()
    if worker == 0:
        try:
            _work(job)
        except BaseException:  # a failure while setting up: the parent reports it as a SandboxError
            try:
                import traceback

                traceback.print_exc()
            except BaseException:
                pass
        os._exit(1)
    os.close(VERDICT_FD)
    while True:
        try:
            _pid, status = os.waitpid(worker, 0)
            break
        except InterruptedError:
            continue
    # As init of a PID namespace, exiting kills everything in it; the /proc we see is then the
    # host's, whose process tree must not be walked from "pid 1".
    if not job["pid_namespace"] and os.getpid() != 1:
        _kill_descendants()
    os._exit(os.waitstatus_to_exitcode(status) % 256)


if __name__ == "__l2t_sandbox__":
    main(JOB)  # noqa: F821  (injected by the bootstrap)
