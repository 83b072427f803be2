"""A server whose port is taken before it binds is started again on a new port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

import pipeline.fleet as fleet_module
from pipeline.config import RolloutConfig
from pipeline.fleet import PORT_CLASH_RETRIES, EmbeddedFleetOptions, RolloutFleet
from pipeline.sglang_server import free_port, http_get

# A stand-in for `sglang.launch_server`: answers /health on --port, or dies like uvicorn when
# the port is taken.
STAND_IN = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _stand_in_argv(model_path, port, host="127.0.0.1", extra_args=()):
    return [sys.executable, "-c", STAND_IN, "--port", str(port)]


@pytest.fixture
def taken_port():
    """A port another socket holds (bound, not listening: connections are refused)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def _fleet(tmp_path: Path) -> RolloutFleet:
    options = EmbeddedFleetOptions("unused", tmp_path, start_timeout_s=60.0, cpu_defaults=False)
    return RolloutFleet(RolloutConfig(num_servers=2), options)


def test_a_server_that_lost_its_port_starts_again_on_another(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(fleet_module, "sglang_server_argv", _stand_in_argv)
    monkeypatch.setattr(fleet_module, "free_port", lambda: next(ports, None) or free_port())
    with _fleet(tmp_path) as fleet:
        assert f":{taken_port}" not in fleet.worker_urls[0]
        assert all(http_get(f"{url}/health")[0] == 200 for url in fleet.worker_urls)
        assert len(fleet.processes) == 2
    assert "Address already in use" in (tmp_path / "sglang-0.log").read_text()


def test_a_port_that_stays_taken_is_an_error(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_module, "sglang_server_argv", _stand_in_argv)
    monkeypatch.setattr(fleet_module, "free_port", lambda: taken_port)
    fleet = _fleet(tmp_path)
    with pytest.raises(RuntimeError, match="sglang-0 exited with code 1 before healthy"):
        fleet.start()
    log = (tmp_path / "sglang-0.log").read_text()
    assert log.count("Address already in use") == PORT_CLASH_RETRIES + 1
    assert not any(process.is_running() for process in fleet.processes)


def test_embedded_servers_compute_in_the_policy_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv_seen = []

    def recording_argv(model_path, port, host="127.0.0.1", extra_args=()):
        argv_seen.append(list(extra_args))
        return _stand_in_argv(model_path, port)

    monkeypatch.setattr(fleet_module, "sglang_server_argv", recording_argv)
    options = EmbeddedFleetOptions("unused", tmp_path, cpu_defaults=False, dtype="float32")
    config = RolloutConfig(num_servers=1, server_args=("--tp", "1"))
    with RolloutFleet(config, options):
        pass
    assert argv_seen == [["--dtype", "float32", "--tp", "1"]]  # server_args may override it
