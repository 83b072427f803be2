"""A stand-in for `sglang.launch_server` in the SLURM fleet test: HTTP 200 with JSON to all.

    python stub_sglang_server.py --host H --port P [--exit-code N] [other flags ...]

Enough for `sglang-router` to register it as a healthy worker (`/health`, `/server_info`,
`/model_info`) and for the launch script's health wait. Prints its command line at start and
one line per request, so the test can read from its log where and how it was started. With
`--exit-code N` it exits with N right away instead (a server that fails to start).
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"model_path": "/nonexistent/stub-model", "is_generation": True})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
        print(f"request {self.command} {self.path}", flush=True)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        """Silence the default stderr access log (requests are printed by `_answer`)."""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exit-code", type=int)
    args, _ = parser.parse_known_args(argv)
    print(f"stub server argv: {json.dumps(argv)}", flush=True)
    if args.exit_code is not None:
        sys.exit(args.exit_code)
    ThreadingHTTPServer((args.host, args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
