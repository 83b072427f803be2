"""A real Prometheus server (Debian `prometheus`) on 127.0.0.1 for tests, stopped by PID."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.sglang_server import ManagedProcess, free_port, http_get


class PrometheusServer:
    """Scrapes `targets` every `interval`; `query` runs PromQL through the HTTP API."""

    def __init__(self, workdir: Path, targets: list[str], interval: str = "500ms") -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("Prometheus is not installed (Debian package `prometheus`)")
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "dapo", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # YAML is a JSON superset
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
        ]
        self._process = ManagedProcess("prometheus", argv, workdir / "prometheus.log", None)

    def __enter__(self) -> PrometheusServer:
        self._process.start()
        self._process.wait_until(self._ready, timeout_s=60, what="Prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def _ready(self) -> bool:
        try:
            return http_get(f"{self.url}/-/ready")[0] == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[dict]:
        """Poll `promql` until it returns a non-empty vector."""
        deadline = time.monotonic() + timeout_s
        while not (result := self.query(promql)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return result
