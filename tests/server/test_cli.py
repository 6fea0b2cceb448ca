"""The serve CLI's own messages: no Ray for --replicas, an exposed server without an API key."""

from __future__ import annotations

import subprocess
import sys


def test_serve_replicas_without_ray_is_a_one_line_message():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from server.cli import main\n"
        "sys.exit(main(['--replicas', '2']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--replicas" in lines[0] and "pip install" in lines[0], lines


def test_serve_warns_when_exposed_without_api_key(caplog):
    from server.cli import warn_if_exposed

    with caplog.at_level("WARNING", logger="cara_serve"):
        assert warn_if_exposed("0.0.0.0", None)
        assert not warn_if_exposed("0.0.0.0", "secret")
        assert not warn_if_exposed("127.0.0.1", None)
        assert not warn_if_exposed("::1", None)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "0.0.0.0" in msgs[0] and "--api-key" in msgs[0]
