"""Wait until every URL answers HTTP 200, or fail naming the ones that did not.

    python launch/wait_healthy.py [--timeout SECONDS] [--watch-pid PID] [--body-contains TEXT]
                                  URL [URL ...]

Used by the SLURM script to hold the trainer until the SGLang servers and the router are up
(the router answers `/health` before its workers register, so the script waits for its
`/workers` page to name every worker: `--body-contains URL`, once per worker). Exit code 0 when
all answered; 1 at the deadline, or as soon as the process `--watch-pid` (the `srun` that starts
the servers) has exited, with the silent URLs printed on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import psutil

from pipeline.sglang_server import http_get


def is_ready(url: str, body_contains: Sequence[str] = ()) -> bool:
    """True when `url` answers 200 with a body that holds every string in `body_contains`."""
    status, body = http_get(url)
    text = body.decode(errors="replace")
    return status == 200 and all(part in text for part in body_contains)


def wait_healthy(
    urls: list[str],
    timeout_s: float,
    alive: Callable[[], bool],
    poll_s: float = 1.0,
    body_contains: Sequence[str] = (),
) -> list[str]:
    """Poll `urls` until all are ready (`is_ready`), `timeout_s` passes or `alive()` turns
    false; returns the URLs still failing."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [url for url in pending if not is_ready(url, body_contains)]
        if not pending or time.monotonic() > deadline or not alive():
            break
        time.sleep(poll_s)
    return pending


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds (default 1800)")
    parser.add_argument("--watch-pid", type=int, help="give up when this process has exited")
    parser.add_argument(
        "--body-contains",
        action="append",
        default=[],
        metavar="TEXT",
        help="a URL is ready only once its body holds TEXT (repeatable)",
    )
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def watched_alive() -> bool:
        return args.watch_pid is None or psutil.pid_exists(args.watch_pid)

    failing = wait_healthy(args.urls, args.timeout, watched_alive, body_contains=args.body_contains)
    if failing:
        why = "" if watched_alive() else f" (process {args.watch_pid} has exited)"
        print(
            f"not healthy after {time.monotonic() - start:.0f} s{why}: {' '.join(failing)}",
            file=sys.stderr,
        )
        return 1
    print(f"healthy after {time.monotonic() - start:.0f} s: {' '.join(args.urls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
