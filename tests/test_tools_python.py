"""The python tool runs code in the evaluation sandbox (lmstack/evals/sandbox.py) and reports, as text, what
contained it: an infinite loop times out, a fork is refused, a write outside its directory fails and leaves
no file, the network is unreachable, a memory bomb fails; output is truncated."""

from __future__ import annotations

from lmstack.tools.python_tool import python_tool


def test_output_and_failures():
    tool = python_tool(timeout_s=3, max_output_chars=100)
    assert tool.call({"code": "print(sum(range(10)))"}) == "45"
    assert tool.call({"code": "x = 1"}) == "[no output]"
    failed = tool.call({"code": "print('before')\nraise ValueError('bad input')"})
    assert failed.startswith("before\n[exit status 1]") and "ValueError: bad input" in failed
    long = tool.call({"code": "print('y' * 500)"})
    assert long.startswith("y" * 100) and "more characters cut" in long


def test_containment(tmp_path):
    tool = python_tool(timeout_s=2, memory_mb=256)
    assert tool.call({"code": "while True:\n    pass"}) == "[timed out after 2 s]"
    assert "Operation not permitted" in tool.call({"code": "import os\nos.fork()"})
    target = tmp_path / "escaped.txt"
    escaped = tool.call({"code": f"open({str(target)!r}, 'w').write('x')"})
    assert "[exit status 1]" in escaped and not target.exists()
    network = tool.call({"code": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"})
    assert "[exit status 1]" in network and ("not allowed" in network or "not permitted" in network)
    bomb = tool.call({"code": "x = bytearray(1 << 30)"})
    assert "MemoryError" in bomb
