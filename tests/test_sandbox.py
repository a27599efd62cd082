"""The code sandbox: right code passes; hostile code (infinite loop, fork bomb, memory bomb, writes outside
the temp dir, network access) is contained, scored as a failure, and leaves the host untouched.

Each hostile snippet runs twice where it matters: with every layer, and with the Python audit hook turned off,
to show that the kernel layers (namespaces, seccomp, rlimits) contain it on their own on this machine.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from lmstack.evals.sandbox import SandboxLimits, run_python, sandbox_capabilities

CAPS = sandbox_capabilities()
LAYERS = [pytest.param(True, id="all-layers"), pytest.param(False, id="kernel-layers-only")]


def _limits(hook: bool, **kw) -> SandboxLimits:
    return SandboxLimits(audit_hook=hook, **kw)


def _sandbox_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("lmstack-sandbox-bootstrap" in part for part in (p.info.get("cmdline") or [])):
            found.append(p)
    return found


def test_correct_code_passes_and_wrong_code_fails():
    ok = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')")
    assert ok.passed and ok.stdout.strip() == "fine"
    bad = run_python("def add(a, b):\n    return a - b\nassert add(2, 3) == 5")
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_python("def broken(:\n    pass")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_the_machine_provides_the_kernel_layers():
    # CI runs on the same kind of machine; if this fails, the kernel-layers-only tests below say why
    assert CAPS["runs"] and CAPS["namespaces"] and CAPS["no_new_processes"]


def test_private_temp_dir_is_cwd_home_and_writable():
    r = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd() == os.environ['HOME'], "
                   "sorted(os.listdir('.')))\nassert not any(k.endswith('_proxy') or k.endswith('_PROXY') "
                   "for k in os.environ)")
    assert r.passed, r.stderr
    assert r.stdout.strip() == "True ['program.py', 'scratch.txt']"


@pytest.mark.parametrize("hook", LAYERS)
def test_infinite_loop_times_out(hook):
    start = time.monotonic()
    r = run_python("while True:\n    pass", limits=_limits(hook, timeout_s=1.5))
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 10
    assert not _sandbox_processes()


@pytest.mark.parametrize("hook", LAYERS)
def test_fork_bomb_is_contained(hook):
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
        r = run_python("import os\nwhile True:\n    os.fork()", limits=_limits(hook, timeout_s=3))
    finally:
        done.set()
        watcher.join()
    assert not r.passed
    assert peak[0] - base < 20, f"the fork bomb reached {peak[0] - base} extra processes"
    assert not _sandbox_processes()


def test_children_that_escape_the_process_group_are_killed():
    # with process creation allowed, a grandchild that calls setsid() still dies with the pid namespace
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nelse:\n    print('parent exits')")
    r = run_python(code, limits=SandboxLimits(forbid_processes=False, audit_hook=False, timeout_s=5))
    assert r.passed and "parent exits" in r.stdout
    assert r.duration_s < 5  # the sandbox did not wait for the sleeper, and ...
    time.sleep(0.2)
    assert not _sandbox_processes()  # ... nothing of it is left running


@pytest.mark.parametrize("hook", LAYERS)
def test_memory_bomb_fails_with_memory_error(hook):
    host_rss = psutil.Process().memory_info().rss
    big = run_python("x = bytearray(8 * 1024 ** 3)", limits=_limits(hook, memory_mb=512))
    assert big.status == "failed" and "MemoryError" in big.stderr
    grow = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))",
                      limits=_limits(hook, memory_mb=512, timeout_s=10))
    assert grow.status == "failed" and "MemoryError" in grow.stderr
    assert psutil.Process().memory_info().rss < host_rss + 100 * 1024 ** 2


@pytest.mark.parametrize("hook", LAYERS)
def test_writes_outside_the_temp_dir_are_refused(hook, tmp_path):
    targets = [tmp_path / "escape_open.txt", tmp_path / "escape_os_open.txt", Path.home() / ".lmstack_escape_test",
               tmp_path / "escape_dir"]
    code = f"""
import os
failures = 0
for attempt in [
    lambda: open({str(targets[0])!r}, "w").write("pwned"),
    lambda: os.close(os.open({str(targets[1])!r}, os.O_WRONLY | os.O_CREAT)),
    lambda: open({str(targets[2])!r}, "a").write("pwned"),
    lambda: os.mkdir({str(targets[3])!r}),
    lambda: os.rename("program.py", {str(tmp_path / 'moved.py')!r}),
]:
    try:
        attempt()
    except OSError:
        failures += 1
assert failures == 5, failures
raise SystemExit(1)  # a hostile program fails the item whatever happens
"""
    (tmp_path / "victim.txt").write_text("keep me")
    r = run_python(code, limits=_limits(hook))
    assert r.status == "failed" and "AssertionError" not in r.stderr, r.stderr
    for t in targets:
        assert not t.exists()
    assert not (tmp_path / "moved.py").exists()
    assert (tmp_path / "victim.txt").read_text() == "keep me"


@pytest.mark.parametrize("hook", LAYERS)
def test_network_is_unreachable_even_on_loopback(hook):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "s.sendall(b'exfiltrated')\nprint('connected')")
        r = run_python(code, limits=_limits(hook, timeout_s=5))
        assert r.status == "failed" and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever reached the host's listener
    finally:
        server.close()


def test_host_process_is_unaffected_after_hostile_runs():
    assert os.getcwd()  # the host still works, and a normal program still passes afterwards
    assert run_python("print(sum(range(10)))").stdout.strip() == "45"
