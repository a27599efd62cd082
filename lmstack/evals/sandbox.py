"""Run untrusted Python (model-generated code) in a contained subprocess and report pass / fail.

    from lmstack.evals.sandbox import run_python
    result = run_python("assert 1 + 1 == 2", timeout_s=5)   # result.passed, result.status, result.stderr

How it is contained, layer by layer (``sandbox_capabilities()`` reports which layers are active here):

1. **Process and time.** The code runs in a new session / process group (``start_new_session``), under a
   wall-clock timeout and ``RLIMIT_CPU``. On timeout or exit the whole group is SIGKILLed.
2. **Resources.** ``RLIMIT_AS`` (address space, default 1 GiB: a memory bomb gets MemoryError),
   ``RLIMIT_NPROC`` (processes: a fork bomb runs out of forks), ``RLIMIT_FSIZE`` (largest file written,
   also caps captured stdout/stderr, which go to files), ``RLIMIT_CORE = 0``, ``RLIMIT_NOFILE``.
3. **Identity (when lmstack runs as root, e.g. in containers and CI).** The code runs as a fresh,
   otherwise unused uid. The kernel then refuses writes to every file and directory that is not
   world-writable, ``RLIMIT_NPROC`` counts only this sandbox's processes, and cleanup kills *every* process
   of that uid with ``kill(-1)`` from a helper running as that uid, so children that escaped the process
   group with ``setsid`` die too.
4. **Network.** The code runs in a fresh network namespace (``unshare(CLONE_NEWNET)``, or
   ``CLONE_NEWUSER | CLONE_NEWNET`` for unprivileged users where user namespaces are enabled): no interfaces
   but a loopback that is down, so nothing, not even this host's 127.0.0.1, can be reached.
5. **Python-level policy (an audit hook installed before the code runs).** Refuses sockets, file writes,
   renames, deletions and directory creation outside the private temporary directory, starting other
   programs (``subprocess``, ``os.system``, ``os.exec*``, ``posix_spawn``) and ``ctypes``.
6. **Environment.** A private temporary directory (mode 0700) is the working directory, $HOME and $TMPDIR;
   the environment is rebuilt from scratch (no proxies, no credentials, no PYTHON* variables) and the
   interpreter runs isolated (``-I``).

Honest caveats: the audit hook (layer 5) is a policy inside the interpreter, not a security boundary;
determined native code could get around it. The hard guarantees come from the kernel layers 1-4. Without
root and without user namespaces, layers 3-4 are absent: network and writes outside the temp dir are then
blocked only by the audit hook, and a process that calls ``setsid`` can outlive the group kill (still bound
by RLIMIT_CPU and RLIMIT_NPROC). This is meant for scoring benchmark code, not for hosting adversaries; run
untrusted code at scale inside a VM or container as well.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Runs first, in a fresh single-threaded interpreter (not subprocess's preexec_fn, which is unsafe in a
# multithreaded host): namespaces, read-only filesystem, rlimits, capability drop, then exec the bootstrap.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x00020000, 0x40000000, 0x20000000
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 0x40000, 0x1000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD, SYS_mount_setattr = 0x1, 0x2, 0x8000, -100, 442
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 24, 38, 22, 2


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def isolate(libc):
    # user + mount + network + pid namespaces; works for root and, where enabled, for unprivileged users
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) != 0:
        return False
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", "0 %d 1" % uid)
    write("/proc/self/gid_map", "0 %d 1" % gid)
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making mounts private failed")
    ro = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(ro), ctypes.sizeof(ro)) != 0:
        raise OSError(ctypes.get_errno(), "read-only remount failed")
    work = os.getcwd().encode()
    if libc.mount(work, work, None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind-mounting the sandbox directory failed")
    rw = MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    if libc.syscall(SYS_mount_setattr, AT_FDCWD, work, 0, ctypes.byref(rw), ctypes.sizeof(rw)) != 0:
        raise OSError(ctypes.get_errno(), "making the sandbox directory writable failed")
    os.chdir(work)  # step onto the new writable mount
    return True


def forbid_new_processes(libc):
    # seccomp filter: fork / vfork / clone without CLONE_THREAD fail with EPERM, clone3 with ENOSYS (glibc then
    # creates threads with clone), so threads work and new processes do not: no fork bombs, no child programs.
    import platform, struct
    arch = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435}),
            "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}.get(platform.machine())
    if arch is None:
        return False
    audit_arch, nr = arch
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS),
             (JEQ, 0, 3, nr["clone"]), (LD, 0, 0, 16), (JSET, 1, 0, 0x00010000), (RET, 0, 0, EPERM),
             (RET, 0, 0, ALLOW)]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
isolated = False
if cfg["namespaces"]:
    try:
        isolated = isolate(libc)
    except OSError as e:
        sys.stderr.write("LMSTACK_SANDBOX isolation failed: %s\n" % e)
        sys.exit(111)
if isolated:
    pid = os.fork()  # the child is PID 1 of the new pid namespace: when it dies, every process in it dies
    if pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher is killed -> so is the namespace
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # exec then grants no capabilities, even as ns root
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
for name, value in cfg["limits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
no_fork = forbid_new_processes(libc) if cfg["forbid_processes"] else False
sys.stderr.write("LMSTACK_SANDBOX isolated=%d no_fork=%d\n" % (int(isolated), int(no_fork)))
sys.stderr.flush()
os.execv(sys.executable, [sys.executable, "-I", "-c", cfg["bootstrap"], "hook" if cfg["audit_hook"] else "nohook"])
"""

# Installs the audit-hook policy, then runs program.py from the private directory as __main__.
_BOOTSTRAP = r"""# lmstack-sandbox-bootstrap
import os, sys

def _install():
    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked_events = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                      "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "socket.getnameinfo",
                      "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
                      "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "pty.spawn",
                      "os.forkpty", "os.putenv", "os.chroot", "os.setxattr", "os.removexattr"}
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                   "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                   "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}

    def inside(path):
        if isinstance(path, int):
            return True  # an fd: it was opened under this same policy
        try:
            full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        except Exception:
            return False
        return full == root or full.startswith(root + os.sep)

    def hook(event, args):
        if event in blocked_events:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "socket.__new__" and args and args[1] not in (1,):  # only AF_UNIX (1) sockets
            raise PermissionError("sandbox: network sockets are not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                      (mode is None and isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")

    sys.addaudithook(hook)

with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
if sys.argv[1:] != ["nohook"]:
    _install()
del _install, _f
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_source, "program.py", "exec"), _globals)
"""


@dataclass
class SandboxResult:
    status: str                 # passed | failed | timeout
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolated: bool = False      # the namespace layers (read-only filesystem, no network, pid namespace) were active
    processes_forbidden: bool = False  # the seccomp layer (no new processes) was active

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0        # wall clock
    memory_mb: int = 1024          # RLIMIT_AS
    max_processes: int = 32        # RLIMIT_NPROC (tasks of the sandbox)
    max_file_mb: int = 16          # RLIMIT_FSIZE: also caps captured stdout / stderr
    max_open_files: int = 256
    output_chars: int = 20_000     # stdout / stderr kept in the result
    namespaces: bool = True        # try the namespace layers (falls back to rlimits + audit hook without them)
    audit_hook: bool = True        # the Python-level policy (tests turn it off to check the kernel layers alone)
    forbid_processes: bool = True  # seccomp: the code may create threads but no processes


_NAMESPACES_WORK: bool | None = None  # learned on first use: can this machine create the namespaces?


def _count_user_tasks(uid: int) -> int:
    """Threads (the unit RLIMIT_NPROC counts) of all processes owned by uid."""
    try:
        import psutil

        total = 0
        for p in psutil.process_iter(["uids", "num_threads"]):
            info = p.info
            if info.get("uids") and info["uids"].real == uid:
                total += info.get("num_threads") or 1
        return total
    except Exception:
        return 4096


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, limits: SandboxLimits | None = None,
               stdin: str = "") -> SandboxResult:
    """Execute ``code`` as a Python program in the sandbox; passed = exit status 0 within the limits."""
    global _NAMESPACES_WORK
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    use_ns = limits.namespaces and sys.platform == "linux" and _NAMESPACES_WORK is not False
    result = _run_once(code, limits, use_ns, stdin)
    if use_ns and result.returncode == 111 and "isolation failed" in result.stderr:
        _NAMESPACES_WORK = False  # e.g. user namespaces disabled: remember, and use the fallback layers
        result = _run_once(code, limits, False, stdin)
    elif use_ns and result.isolated:
        _NAMESPACES_WORK = True
    return result


def _run_once(code: str, limits: SandboxLimits, use_ns: bool, stdin: str) -> SandboxResult:
    host_dir = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-io-"))  # stdout/stderr files, outside the sandbox
    work = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-"))         # mode 0700: private to this user
    try:
        (work / "program.py").write_text(code, encoding="utf-8")
        # inside the namespaces the count is per-sandbox; without them it is per user, so add what is running
        nproc = limits.max_processes if use_ns else _count_user_tasks(os.getuid()) + limits.max_processes
        cfg = {
            "namespaces": use_ns,
            "audit_hook": limits.audit_hook,
            "forbid_processes": limits.forbid_processes,
            "bootstrap": _BOOTSTRAP,
            "limits": {"RLIMIT_AS": limits.memory_mb * 1024 * 1024, "RLIMIT_CPU": max(1, int(limits.timeout_s) + 1),
                       "RLIMIT_FSIZE": limits.max_file_mb * 1024 * 1024, "RLIMIT_CORE": 0,
                       "RLIMIT_NPROC": nproc, "RLIMIT_NOFILE": limits.max_open_files},
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        start = time.monotonic()
        with open(host_dir / "stdout", "wb") as out, open(host_dir / "stderr", "wb") as err, \
                open(host_dir / "stdin", "w+b") as inp:
            inp.write(stdin.encode())
            inp.seek(0)
            proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, json.dumps(cfg)], cwd=work, env=env,
                                    stdin=inp, stdout=out, stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also ends children a finished program left behind
        duration = time.monotonic() - start
        stdout = _read_head(host_dir / "stdout", limits.output_chars)
        stderr = _read_head(host_dir / "stderr", limits.output_chars)
        header = ""
        if stderr.startswith("LMSTACK_SANDBOX isolated="):
            header, _, stderr = stderr.partition("\n")
        status = "timeout" if timed_out else ("passed" if proc.returncode == 0 else "failed")
        return SandboxResult(status=status, returncode=proc.returncode, stdout=stdout, stderr=stderr,
                             duration_s=duration, isolated="isolated=1" in header,
                             processes_forbidden="no_fork=1" in header)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group; in the pid namespace that takes every process of the sandbox."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _read_head(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        return f.read(chars * 4).decode("utf-8", errors="replace")[:chars]


def run_many(programs: Sequence[str], timeout_s: float = 10.0, workers: int = 2,
             memory_mb: int = 1024) -> list[SandboxResult]:
    """Run several programs, ``workers`` at a time (each in its own sandbox)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: run_python(c, timeout_s=timeout_s, memory_mb=memory_mb), programs))


def sandbox_capabilities() -> dict[str, bool]:
    """Which containment layers are active on this machine (see the module docstring)."""
    probe = run_python("print('ok')", timeout_s=20)
    return {"runs": probe.passed, "namespaces": probe.isolated, "no_new_processes": probe.processes_forbidden,
            "rlimits": True, "audit_hook": True}
