"""Run untrusted Python (model-generated code) in a contained subprocess and report pass / fail.

    from lmstack.evals.sandbox import run_python
    result = run_python("assert 1 + 1 == 2", timeout_s=5)   # result.passed, result.status, result.isolation

The code runs in one of three isolation modes. ``run_python`` picks the strongest one this machine provides
(``available_modes()`` says which, and why not the others) and records it in ``SandboxResult.isolation``;
the evaluation harness records it in its results and prints it.

``namespaces`` (Linux with user namespaces: the usual case)
    New user, mount, PID and network namespaces. The whole filesystem is remounted read-only except the
    private working directory; a private /proc shows only the sandbox's own processes (where the kernel
    refuses to mount one, /proc is an empty read-only directory); the network namespace has nothing but a
    loopback that is down; all capabilities are dropped before the code starts. The sandbox cannot write or
    delete outside its directory (by any path, ``dir_fd`` included), cannot see or signal any process
    outside itself, and cannot read other processes' environments or command lines. When the sandbox's
    first process ends, the kernel ends every process of its PID namespace.

``landlock`` (Linux 6.12 or later when namespaces are refused, e.g. in a container with a default seccomp
profile)
    A Landlock ruleset: writes, deletes, renames and new files only beneath the private directory; reads
    everywhere except /proc; no TCP bind or connect; signals only to processes of the same sandbox
    (``LANDLOCK_SCOPE_SIGNAL``); no ptrace-style access (``/proc/PID/environ``, ``process_vm_readv``) to
    other processes. Creating new processes is forbidden (below), so the group kill at the end cannot be
    escaped.

``unsafe-fallback`` (neither is available)
    Only the limits and filters that every mode shares (below). The code can then write wherever the user
    can, signal the user's other processes and read their environments: it is **escapable** and runs only
    when the user opts in, with ``SandboxLimits(allow_unsafe=True)``, the environment variable
    ``LMSTACK_SANDBOX=unsafe-fallback``, or ``lmstack eval --unsafe-sandbox``. Otherwise ``run_python``
    raises :class:`lmstack.errors.UserError` naming why the contained modes are unavailable.

Every mode also has:

* **A seccomp filter.** No ``fork``/``vfork``/``clone`` of processes (threads still work), no ``socket()``
  (so no network of any family, and no connecting to Unix sockets on the read-only filesystem), no
  ``io_uring``, ``unshare`` or ``setns``; system calls of any other ABI (x32, i386) are refused. Outside
  the namespaces mode it also refuses changes of file metadata (``chmod``, ``chown``, ``utime``, extended
  attributes), which Landlock does not cover, so there ``shutil.copy`` fails even inside the directory. The
  two contained modes refuse to run without the filter (it exists for x86_64 and aarch64).
* **Resource limits.** A wall-clock timeout and ``RLIMIT_CPU`` (the whole process group is SIGKILLed at
  the end), ``RLIMIT_AS`` (a memory bomb gets MemoryError), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` (also caps
  the captured stdout / stderr), ``RLIMIT_NOFILE``, no core dumps.
* **A clean environment.** The private directory (mode 0700) is the working directory, $HOME and $TMPDIR;
  the environment is rebuilt from scratch (no secrets, proxies or PYTHON* variables of the caller), and the
  interpreter runs isolated (``-I``).
* **A Python audit hook** that refuses sockets, writes outside the directory, starting programs, signals
  and ``ctypes``. It is a policy inside the interpreter, not a boundary (it does not see ``dir_fd``, and
  native code can bypass it); the containment claims above hold with it switched off, and the tests check
  them that way.

Honest caveats: in every mode the code can *read* the files that the user running lmstack can read (other
than /proc): keep credentials out of reach of that user, or run evaluations in a VM or container.
``SandboxLimits(forbid_processes=False)`` (allowed in the namespaces mode only) lets the code start
processes; they still die with the PID namespace. This is meant for scoring benchmark code, not for
hosting adversaries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import UserError

MODES = ("namespaces", "landlock", "unsafe-fallback")   # strongest first
CONTAINED_MODES = ("namespaces", "landlock")
UNSAFE_ENV = "LMSTACK_SANDBOX"                           # LMSTACK_SANDBOX=unsafe-fallback: the user's opt-in
_UNAVAILABLE = "LMSTACK_SANDBOX unavailable: "           # the launcher's first stderr line when a mode fails
_UNAVAILABLE_EXIT = 111

# Runs first, in a fresh single-threaded interpreter (not subprocess's preexec_fn, which is unsafe in a
# multithreaded host): the mode's isolation, rlimits, the seccomp filter, then exec of the bootstrap.
_LAUNCHER = r"""
import ctypes, json, os, platform, resource, signal, struct, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x20000, 0x40000000, 0x20000000
CLONE_THREAD = 0x10000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD, SYS_mount_setattr = 0x1, 0x2, 0x8000, -100, 442
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 24, 38, 22, 2
SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446


def unavailable(why):
    sys.stderr.write("LMSTACK_SANDBOX unavailable: %s\n" % why)
    sys.stderr.flush()
    os._exit(111)


def check(ret, step):
    if ret != 0:
        unavailable("%s failed (%s)" % (step, os.strerror(ctypes.get_errno())))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def enter_namespaces(work):
    # user + mount + network + pid namespaces; works for root and, where enabled, for unprivileged users
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare of namespaces")
    try:
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "0 %d 1" % uid)
        write("/proc/self/gid_map", "0 %d 1" % gid)
    except OSError as e:
        unavailable("writing the uid map failed (%s)" % e)
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    ro = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    check(libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(ro), ctypes.sizeof(ro)),
          "read-only remount")
    check(libc.mount(work, work, None, MS_BIND, None), "bind-mounting the sandbox directory")
    rw = MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    check(libc.syscall(SYS_mount_setattr, AT_FDCWD, work, 0, ctypes.byref(rw), ctypes.sizeof(rw)),
          "making the sandbox directory writable")
    os.chdir(work)  # step onto the new writable mount
    pid = os.fork()  # the child is PID 1 of the new pid namespace: when it dies, every process in it dies
    if pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher is killed -> so is the namespace
    # a /proc of this pid namespace: the host's processes, their command lines and environments are not in it;
    # where the kernel refuses one (the host's /proc has masked paths), an empty read-only /proc instead
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        check(libc.mount(b"none", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
              "hiding the host's /proc")
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # exec then grants no capabilities, even as ns root


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def enter_landlock(work):
    abi = libc.syscall(SYS_landlock_create_ruleset, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 0:
        unavailable("Landlock is not enabled in this kernel (%s)" % os.strerror(ctypes.get_errno()))
    if abi < 6:
        unavailable("Landlock ABI %d is too old: scoping signals needs ABI 6 (Linux 6.12)" % abi)
    all_fs = (1 << 16) - 1                    # EXECUTE ... IOCTL_DEV: every right of ABI 5+
    read_dir, read_file = 1 | 4 | 8, 1 | 4     # EXECUTE | READ_FILE (| READ_DIR)
    write_file = 2 | 4 | (1 << 14)            # WRITE_FILE | READ_FILE | TRUNCATE
    attr = RulesetAttr(all_fs, 1 | 2, 1 | 2)  # no TCP bind/connect; scoped: abstract Unix sockets, signals
    ruleset = libc.syscall(SYS_landlock_create_ruleset, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        unavailable("creating the Landlock ruleset failed (%s)" % os.strerror(ctypes.get_errno()))

    def allow(path, access):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = PathBeneathAttr(access, fd)
            check(libc.syscall(SYS_landlock_add_rule, ruleset, 1, ctypes.byref(rule), 0), "Landlock rule for " + path)
        finally:
            os.close(fd)

    for name in sorted(os.listdir("/")):
        path = "/" + name
        if name == "proc" or not os.path.exists(path):
            continue  # /proc holds every process's command line
        allow(path, read_dir if os.path.isdir(path) else read_file)
    if os.path.exists("/dev/null"):
        allow("/dev/null", write_file)
    allow(work, all_fs)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    check(libc.syscall(SYS_landlock_restrict_self, ruleset, 0), "Landlock restrict_self")


def seccomp_filter(forbid_processes, forbid_metadata):
    # fork / vfork / clone without CLONE_THREAD fail with EPERM, clone3 with ENOSYS (glibc then creates threads
    # with clone); every other listed call fails with EPERM; a call of another syscall ABI fails altogether
    # Landlock does not cover metadata: outside the namespaces mode chmod / chown / utime / xattr calls are refused
    arch = {"x86_64": (0xC000003E, dict(fork=57, vfork=58, clone=56, clone3=435, socket=41, io_uring_setup=425,
                                        unshare=272, setns=308, chmod=90, fchmod=91, fchmodat=268, fchmodat2=452,
                                        chown=92, fchown=93, lchown=94, fchownat=260, utime=132, utimes=235,
                                        futimesat=261, utimensat=280, setxattr=188, lsetxattr=189, fsetxattr=190,
                                        removexattr=197, lremovexattr=198, fremovexattr=199, setxattrat=463,
                                        removexattrat=466)),
            "aarch64": (0xC00000B7, dict(clone=220, clone3=435, socket=198, io_uring_setup=425, unshare=97,
                                         setns=268, fchmod=52, fchmodat=53, fchmodat2=452, fchownat=54, fchown=55,
                                         utimensat=88, setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14,
                                         lremovexattr=15, fremovexattr=16, setxattrat=463,
                                         removexattrat=466))}.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr = arch
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, EPERM), (LD, 0, 0, 0)]
    if audit_arch == 0xC000003E:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # x32 system calls
    process_calls = {"fork": EPERM, "vfork": EPERM, "clone3": ENOSYS, "clone": None}  # clone: checked below
    always = ("socket", "io_uring_setup", "unshare", "setns")
    for name, number in nr.items():
        if name in always or (forbid_metadata and name not in process_calls):
            prog += [(JEQ, 0, 1, number), (RET, 0, 0, EPERM)]
        elif forbid_processes and process_calls.get(name) is not None:
            prog += [(JEQ, 0, 1, number), (RET, 0, 0, process_calls[name])]
    if forbid_processes:
        prog += [(JEQ, 0, 3, nr["clone"]), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, EPERM)]
    prog += [(RET, 0, 0, ALLOW)]
    return prog


def install_seccomp(prog):
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


mode, work = cfg["mode"], os.getcwd().encode()
if mode == "namespaces":
    enter_namespaces(work)
elif mode == "landlock":
    enter_landlock(os.getcwd())
for name, value in cfg["limits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
prog = seccomp_filter(cfg["forbid_processes"], forbid_metadata=mode != "namespaces")
filtered = prog is not None and install_seccomp(prog)
if not filtered and mode != "unsafe-fallback":
    unavailable("no seccomp filter could be installed on %s" % platform.machine())
libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
sys.stderr.write("LMSTACK_SANDBOX mode=%s\n" % mode)
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
                      "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym",
                      "ctypes.cdata", "ctypes.call_function", "pty.spawn", "os.forkpty", "os.putenv", "os.chroot",
                      "os.setxattr", "os.removexattr"}
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
    isolation: str              # the mode the code ran in: namespaces | landlock | unsafe-fallback

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
    mode: str = "auto"             # auto (the strongest available) | namespaces | landlock | unsafe-fallback
    allow_unsafe: bool = False     # the user's opt-in to the escapable unsafe-fallback mode
    audit_hook: bool = True        # the Python-level policy (tests turn it off to check the kernel layers alone)
    forbid_processes: bool = True  # seccomp: the code may create threads but no processes


# what each mode guarantees, in a phrase: printed under evaluation tables and in report cards
GUARANTEES = {
    "namespaces": "contained: read-only filesystem outside its directory, private /proc, own PID and network "
                  "namespaces",
    "landlock": "contained: Landlock confines writes to its directory and signals to itself, no /proc, no network",
    "unsafe-fallback": "ESCAPABLE: resource limits, seccomp and an audit hook only; run because the user opted in",
}


def describe_isolation(modes: str) -> str:
    """The guarantee of a recorded mode (or of each mode of a comma-separated list)."""
    return "; ".join(f"{mode}: {GUARANTEES.get(mode, 'unknown mode')}" if "," in modes else
                     GUARANTEES.get(mode, "unknown mode") for mode in modes.split(","))


# mode -> None (works here) or the reason it does not; learned by probing once per process
_availability: dict[str, str | None] = {}
_availability_lock = threading.Lock()


def available_modes() -> dict[str, str | None]:
    """Each isolation mode -> None when this machine provides it, else the reason it does not."""
    return {mode: _unavailable_reason(mode) for mode in MODES}


def unsafe_opted_in(allow_unsafe: bool = False) -> bool:
    """Whether the user accepted the escapable mode: the argument or ``LMSTACK_SANDBOX=unsafe-fallback``."""
    value = os.environ.get(UNSAFE_ENV, "").strip()
    if value and value != "unsafe-fallback":
        raise UserError(f"{UNSAFE_ENV}={value!r} is not understood; the only value is 'unsafe-fallback' "
                        "(run untrusted code in the escapable mode when no contained mode is available)")
    return allow_unsafe or value == "unsafe-fallback"


def choose_mode(mode: str = "auto", allow_unsafe: bool = False) -> str:
    """The isolation mode a run will use; UserError when only the escapable mode is left and not opted in."""
    if mode not in ("auto", *MODES):
        raise UserError(f"sandbox mode {mode!r} is unknown; choose from auto, {', '.join(MODES)}")
    for candidate in (CONTAINED_MODES if mode == "auto" else (mode,)):
        if candidate in CONTAINED_MODES and _unavailable_reason(candidate) is None:
            return candidate
    if mode in CONTAINED_MODES:
        raise UserError(f"the {mode} sandbox is not available here: {_unavailable_reason(mode)}")
    why = "; ".join(f"{m}: {_unavailable_reason(m)}" for m in CONTAINED_MODES)
    if not unsafe_opted_in(allow_unsafe):
        raise UserError(f"refusing to run untrusted code: no contained sandbox is available here ({why}). Run on a "
                        f"machine that allows one, or accept an escapable sandbox with --unsafe-sandbox or "
                        f"{UNSAFE_ENV}=unsafe-fallback")
    return "unsafe-fallback"


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, limits: SandboxLimits | None = None,
               stdin: str = "") -> SandboxResult:
    """Execute ``code`` as a Python program in the sandbox; passed = exit status 0 within the limits."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    mode = choose_mode(limits.mode, limits.allow_unsafe)
    if not limits.forbid_processes and mode != "namespaces":
        raise UserError(f"forbid_processes=False needs the namespaces sandbox (here: {mode}); without a PID "
                        "namespace started processes could outlive the sandbox")
    result, reason = _run_once(code, limits, mode, stdin)
    if reason is not None:  # the probe passed but this run could not isolate: remember, and choose again
        with _availability_lock:
            _availability[mode] = reason
        return run_python(code, limits=limits, stdin=stdin)
    return result


def _unavailable_reason(mode: str) -> str | None:
    with _availability_lock:
        if mode in _availability:
            return _availability[mode]
    if mode != "unsafe-fallback" and sys.platform != "linux":
        reason: str | None = "needs Linux"
    else:
        _, reason = _run_once("pass", SandboxLimits(timeout_s=20), mode, "")
    with _availability_lock:
        _availability[mode] = reason
    return reason


def _run_once(code: str, limits: SandboxLimits, mode: str, stdin: str) -> tuple[SandboxResult, str | None]:
    """One run in ``mode``; the second value is why the mode could not be set up (None when it was)."""
    host_dir = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-io-"))  # stdout/stderr files, outside the sandbox
    work = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-"))         # mode 0700: private to this user
    try:
        (work / "program.py").write_text(code, encoding="utf-8")
        # in a pid namespace the count is per sandbox; elsewhere it is per user, so add what is running
        nproc = limits.max_processes + (0 if mode == "namespaces" else _count_user_tasks(os.getuid()))
        cfg = {
            "mode": mode,
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
        if proc.returncode == _UNAVAILABLE_EXIT and stderr.startswith(_UNAVAILABLE):
            why = stderr[len(_UNAVAILABLE):].partition("\n")[0]
            return SandboxResult("failed", proc.returncode, stdout, stderr, duration, mode), why
        header, _, rest = stderr.partition("\n")
        if header == f"LMSTACK_SANDBOX mode={mode}":
            stderr = rest
        elif not timed_out:
            return SandboxResult("failed", proc.returncode, stdout, stderr, duration, mode), \
                f"the launcher stopped before isolating the code: {stderr[:300]!r}"
        status = "timeout" if timed_out else ("passed" if proc.returncode == 0 else "failed")
        return SandboxResult(status, proc.returncode, stdout, stderr, duration, mode), None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host_dir, ignore_errors=True)


def _count_user_tasks(uid: int) -> int:
    """Threads (the unit RLIMIT_NPROC counts) of all processes owned by uid."""
    import psutil

    total = 0
    for process in psutil.process_iter(["uids", "num_threads"]):
        info = process.info
        if info.get("uids") and info["uids"].real == uid:
            total += info.get("num_threads") or 1
    return total


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
    # the namespace's first process is the launcher's child: wait until the kernel has taken it down too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _read_head(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        return f.read(chars * 4).decode("utf-8", errors="replace")[:chars]
