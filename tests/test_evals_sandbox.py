"""The code sandbox against an attack list, in every isolation mode this machine provides.

Right code passes; each hostile program (infinite loop, fork bomb, memory bomb, writes and deletes outside
its directory by absolute path and through ``dir_fd``, signals to the parent and to other processes of the
user, reading other processes' environments and command lines through /proc, reading the caller's secret
environment variables, network connections over TCP, UDP and Unix sockets) is contained and leaves the host
untouched. The attacks run with the Python audit hook switched off, so what contains them is the kernel.

A contained mode that this machine cannot provide is reported as a skip with the kernel's reason; the
namespaces mode must be available here. The escapable ``unsafe-fallback`` mode is not in the attack list:
the tests show that it is refused without an explicit opt-in, and that it really is escapable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lmstack.errors import UserError
from lmstack.evals.sandbox import (CONTAINED_MODES, SandboxLimits, available_modes, choose_mode, run_python)

AVAILABLE = available_modes()
SECRET = "lmstack-secret-7f3a91"      # in the caller's environment and in a victim process's environment
MARKER = "lmstack-cmdline-marker-c4e2"  # in a victim process's command line


@pytest.fixture(params=CONTAINED_MODES)
def mode(request) -> str:
    reason = AVAILABLE[request.param]
    if reason is not None:
        pytest.skip(f"the {request.param} sandbox is not available on this machine: {reason}")
    return request.param


@pytest.fixture
def victim():
    """Another process of the same user, with a secret in its environment and a marker in its command line."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", MARKER],
                            env={**os.environ, "LMSTACK_VICTIM_SECRET": SECRET})
    yield proc
    proc.kill()
    proc.wait()


def _kernel_only(mode: str, **kw) -> SandboxLimits:
    return SandboxLimits(mode=mode, audit_hook=False, **kw)


def _sandbox_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("lmstack-sandbox-bootstrap" in part for part in (p.info.get("cmdline") or [])):
            found.append(p)
    return found


def test_the_namespaces_mode_runs_on_this_machine():
    assert AVAILABLE["namespaces"] is None, AVAILABLE["namespaces"]
    assert run_python("print('ok')").isolation == "namespaces"  # auto picks the strongest mode


def test_correct_code_passes_and_wrong_code_fails(mode):
    limits = SandboxLimits(mode=mode)
    ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')", limits=limits)
    assert ok.passed and ok.stdout.strip() == "fine" and ok.isolation == mode
    bad = run_python("def add(a, b):\n    return a - b\nassert add(2, 3) == 5", limits=limits)
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_python("def broken(:\n    pass", limits=limits)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr
    threads = run_python("import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start()\n"
                         "t.join()", limits=limits)
    assert threads.passed and threads.stdout.strip() == "thread"


def test_private_temp_dir_is_cwd_home_and_writable(mode):
    r = run_python("import os\nopen('scratch.txt', 'w').write('x')\nos.mkdir('sub')\nos.rename('sub', 'sub2')\n"
                   "print(os.getcwd() == os.environ['HOME'], sorted(os.listdir('.')))\n"
                   "assert not any(k.endswith('_proxy') or k.endswith('_PROXY') for k in os.environ)",
                   limits=SandboxLimits(mode=mode))
    assert r.passed, r.stderr
    assert r.stdout.strip() == "True ['program.py', 'scratch.txt', 'sub2']"


def test_infinite_loop_times_out(mode):
    start = time.monotonic()
    r = run_python("while True:\n    pass", limits=_kernel_only(mode, timeout_s=1.5))
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 10
    assert not _sandbox_processes()


def test_fork_bomb_is_contained(mode):
    base = len(psutil.pids())
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(psutil.pids()))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = run_python("import os\nwhile True:\n    os.fork()", limits=_kernel_only(mode, timeout_s=3))
    finally:
        done.set()
        watcher.join()
    assert not r.passed and "PermissionError" in r.stderr
    assert peak[0] - base < 20, f"the fork bomb reached {peak[0] - base} extra processes"
    assert not _sandbox_processes()


def test_memory_bomb_fails_with_memory_error(mode):
    host_rss = psutil.Process().memory_info().rss
    big = run_python("x = bytearray(8 * 1024 ** 3)", limits=_kernel_only(mode, memory_mb=512))
    assert big.status == "failed" and "MemoryError" in big.stderr
    grow = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))",
                      limits=_kernel_only(mode, memory_mb=512, timeout_s=10))
    assert grow.status == "failed" and "MemoryError" in grow.stderr
    assert psutil.Process().memory_info().rss < host_rss + 100 * 1024 ** 2


def _write_attacks(outside: Path, home_target: Path) -> str:
    """A program that tries every way to write, delete or change a file outside its directory."""
    return f"""
import os
out, home = {str(outside)!r}, {str(home_target)!r}
d = os.open(out, os.O_RDONLY | os.O_DIRECTORY)

def via_symlink():
    os.symlink(out + "/victim.txt", "link")
    open("link", "w").write("pwned")

def via_hard_link():
    os.link(out + "/victim.txt", "hard")
    open("hard", "w").write("pwned")

attacks = {{
    "open": lambda: open(out + "/escape_open.txt", "w").write("pwned"),
    "os.open": lambda: os.close(os.open(out + "/escape_os_open.txt", os.O_WRONLY | os.O_CREAT)),
    "home": lambda: open(home, "a").write("pwned"),
    "mkdir": lambda: os.mkdir(out + "/escape_dir"),
    "rename out": lambda: os.rename("program.py", out + "/moved.py"),
    "overwrite victim": lambda: open(out + "/victim.txt", "w").write("pwned"),
    "delete victim": lambda: os.remove(out + "/victim.txt"),
    "truncate victim": lambda: os.truncate(out + "/victim.txt", 0),
    "chmod victim": lambda: os.chmod(out + "/victim.txt", 0o777),
    "utime victim": lambda: os.utime(out + "/victim.txt", (0, 0)),
    "dir_fd create": lambda: os.close(os.open("escape_fd.txt", os.O_WRONLY | os.O_CREAT, dir_fd=d)),
    "dir_fd overwrite": lambda: os.close(os.open("victim.txt", os.O_WRONLY | os.O_TRUNC, dir_fd=d)),
    "dir_fd delete": lambda: os.unlink("victim.txt", dir_fd=d),
    "dir_fd rename": lambda: os.rename("victim.txt", "renamed.txt", src_dir_fd=d, dst_dir_fd=d),
    "dir_fd mkdir": lambda: os.mkdir("escape_fd_dir", dir_fd=d),
    "dir_fd symlink": lambda: os.symlink("/etc/passwd", "escape_link", dir_fd=d),
    "symlink then write": via_symlink,
    "hard link then write": via_hard_link,
}}
escaped = []
for name, attack in attacks.items():
    try:
        attack()
        escaped.append(name)
    except OSError:
        pass
print("escaped:", escaped)
"""


def test_writes_and_deletes_outside_the_directory_are_refused(mode, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim_file = outside / "victim.txt"
    victim_file.write_text("keep me")
    before = victim_file.stat()
    home_target = Path.home() / ".lmstack_escape_test"
    r = run_python(_write_attacks(outside, home_target), limits=_kernel_only(mode))
    assert r.passed, r.stderr
    assert r.stdout.strip() == "escaped: []"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert victim_file.read_text() == "keep me"
    after = victim_file.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert not home_target.exists()


def test_processes_outside_the_sandbox_cannot_be_signalled(mode, victim):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    code = f"""
import os, signal
refused = []
targets = [p for p in (os.getppid(), {os.getpid()}) if p > 0]  # the parent (0 in a pid namespace), the host
for pid in targets:
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        refused.append("host")
try:
    os.kill({victim.pid}, signal.SIGKILL)  # another process of the same user
except OSError:
    refused.append("victim")
others = []  # every other process this code may signal (signal 0 only checks the permission)
for pid in range(1, {max(psutil.pids()) + 1000}):
    try:
        os.kill(pid, 0)
        others.append(pid)
    except OSError:
        pass
others.remove(os.getpid())
if others:
    refused.append(f"could signal {{others}}")
print(len(targets), refused)
"""
    try:
        r = run_python(code, limits=_kernel_only(mode))
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert r.passed, r.stderr
    count, refused = r.stdout.strip().split(" ", 1)
    assert refused == str(["host"] * int(count) + ["victim"])
    assert not received, "a signal from the sandbox reached the host process"
    assert victim.poll() is None, "the sandbox killed another process of the user"


def test_other_processes_environment_and_command_line_are_unreadable(mode, victim, monkeypatch):
    monkeypatch.setenv("LMSTACK_HOST_SECRET", SECRET)
    code = f"""
import os
found = []
try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
except OSError:
    pids = []
for pid in pids + [str({victim.pid}), str({os.getpid()})]:
    for part in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{{pid}}/{{part}}", "rb").read()
        except OSError:
            continue
        if {SECRET.encode()!r} in data or {MARKER.encode()!r} in data:
            found.append(pid + "/" + part)
print("found:", found, "env:", any({SECRET!r} in v for v in os.environ.values()))
print("processes visible:", len(pids))
"""
    time.sleep(0.1)  # the victim has started
    r = run_python(code, limits=_kernel_only(mode))
    assert r.passed, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "found: [] env: False"
    assert int(lines[1].split(": ")[1]) <= 1  # a private /proc shows the sandbox alone, or no /proc at all


def test_network_is_unreachable_over_tcp_udp_and_unix_sockets(mode, tmp_path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    unix_path = tmp_path / "h.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix.listen(1)
    unix.settimeout(0.5)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0lmstack-test-{os.getpid()}")
    abstract.listen(1)
    abstract.settimeout(0.5)
    code = f"""
import socket
def tcp():
    socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=2).sendall(b"exfiltrated")
def udp():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"exfiltrated", ("127.0.0.1", {udp.getsockname()[1]}))
def unix(address):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(address)
    s.sendall(b"exfiltrated")
escaped = []
for name, attack in [("tcp", tcp), ("udp", udp), ("unix", lambda: unix({str(unix_path)!r})),
                     ("abstract", lambda: unix("\\0lmstack-test-{os.getpid()}"))]:
    try:
        attack()
        escaped.append(name)
    except OSError:
        pass
print("escaped:", escaped)
"""
    try:
        r = run_python(code, limits=_kernel_only(mode, timeout_s=5))
        assert r.passed, r.stderr
        assert r.stdout.strip() == "escaped: []"
        for server in (tcp, unix, abstract):
            with pytest.raises(socket.timeout):
                server.accept()  # nothing ever reached the host's listeners
        with pytest.raises(socket.timeout):
            udp.recvfrom(100)
    finally:
        for server in (tcp, udp, unix, abstract):
            server.close()


def test_children_that_escape_the_process_group_die_with_the_pid_namespace():
    if AVAILABLE["namespaces"] is not None:
        pytest.skip(f"the namespaces sandbox is not available on this machine: {AVAILABLE['namespaces']}")
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nelse:\n    print('parent exits')"
    r = run_python(code, limits=SandboxLimits(mode="namespaces", forbid_processes=False, audit_hook=False,
                                              timeout_s=5))
    assert r.passed and "parent exits" in r.stdout
    assert r.duration_s < 5  # the sandbox did not wait for the sleeper, and ...
    time.sleep(0.2)
    assert not _sandbox_processes()  # ... nothing of it is left running
    with pytest.raises(UserError, match="needs the namespaces sandbox"):
        run_python("pass", limits=SandboxLimits(mode="landlock", forbid_processes=False))


def test_the_escapable_mode_needs_an_explicit_opt_in(monkeypatch):
    monkeypatch.delenv("LMSTACK_SANDBOX", raising=False)
    with pytest.raises(UserError, match="unsafe-sandbox"):
        run_python("print('hi')", limits=SandboxLimits(mode="unsafe-fallback"))
    opted = run_python("print('hi')", limits=SandboxLimits(mode="unsafe-fallback", allow_unsafe=True))
    assert opted.passed and opted.isolation == "unsafe-fallback"
    monkeypatch.setenv("LMSTACK_SANDBOX", "unsafe-fallback")
    assert choose_mode("unsafe-fallback") == "unsafe-fallback"
    assert choose_mode() == "namespaces"  # the opt-in never weakens a machine that can contain the code
    monkeypatch.setenv("LMSTACK_SANDBOX", "yes")
    with pytest.raises(UserError, match="LMSTACK_SANDBOX='yes' is not understood"):
        choose_mode("unsafe-fallback")
    with pytest.raises(UserError, match="choose from auto, namespaces, landlock, unsafe-fallback"):
        choose_mode("chroot")


def test_the_escapable_mode_is_really_escapable(tmp_path):
    # why it needs the opt-in: with the kernel layers absent, a dir_fd write lands outside (the hook cannot see it)
    code = (f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
            "os.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d))")
    r = run_python(code, limits=SandboxLimits(mode="unsafe-fallback", allow_unsafe=True))
    assert r.passed, r.stderr
    assert (tmp_path / "escaped.txt").exists()
    hooked = run_python(f"open({str(tmp_path / 'hooked.txt')!r}, 'w')",
                        limits=SandboxLimits(mode="unsafe-fallback", allow_unsafe=True))
    assert hooked.status == "failed" and "outside the sandbox directory" in hooked.stderr  # the hook's policy
    assert not (tmp_path / "hooked.txt").exists()
