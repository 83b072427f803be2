"""Local SGLang server and `sglang-router` processes: command lines, start, health wait, stop.

Each process runs in its own process group under `pipeline.group_reaper` (so its scheduler and
detokenizer children go with it, even when its owner is killed), writes stdout and stderr to a
log file, and is stopped by PID: SIGTERM to the group, then SIGKILL after a grace period.
Health is polled over HTTP with a deadline; a process that exits while starting fails fast with
the tail of its log.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline import group_reaper
from pipeline.parent_death import exit_with_parent

CPU_KV_TOKENS = 8192
"""KV pool of a CPU server, in tokens (SGLang would reserve ~15 GB), unless a sample needs more."""

CPU_SERVER_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--skip-server-warmup",
    "--sleep-on-idle",
    "--max-running-requests",
    "16",
)
"""Flags for SGLang on CPU: the native attention, no warm-up and no idle spinning; the KV pool
comes from `cpu_server_args`."""

SERVER_RESERVED_TOKENS = 2
"""Tokens of a request's budget SGLang keeps for itself. With capacity = min(context length, KV
pool), it serves prompt + max_new_tokens + 2 <= capacity and silently lowers `max_new_tokens`
of longer requests, and it refuses prompts of capacity - 6 tokens or more
(`managers/tp_worker.py`: max_req_len = capacity - 1, max_req_input_len = max_req_len - 5)."""
PROMPT_RESERVED_TOKENS = 7
"""prompt + 7 <= capacity: the prompt limit above."""


def sample_token_budget(max_prompt_length: int, max_response_length: int) -> int:
    """The capacity (min(context length, KV pool), tokens) a server needs so that a prompt of up
    to `max_prompt_length` tokens always gets its `max_response_length` new tokens."""
    return max_prompt_length + max(
        max_response_length + SERVER_RESERVED_TOKENS, PROMPT_RESERVED_TOKENS
    )


def cpu_server_args(sample_tokens: int) -> tuple[str, ...]:
    """`CPU_SERVER_ARGS` and a KV pool of `CPU_KV_TOKENS`, or `sample_tokens` if more."""
    return (*CPU_SERVER_ARGS, "--max-total-tokens", str(max(CPU_KV_TOKENS, sample_tokens)))


def sglang_dtype_args(dtype: str | None) -> tuple[str, ...]:
    """`--dtype` for servers of a policy trained in `dtype` (`model.params_dtype`), so the fleet
    computes in the trainer's precision; SGLang's `auto` would serve a float32 checkpoint in
    float16. () for None (SGLang's own choice)."""
    return ("--dtype", dtype) if dtype is not None else ()


DETERMINISTIC_SERVER_FLAG = "--enable-deterministic-inference"
"""Makes SGLang honour each request's `sampling_seed` (on CPU: launch/sglang_cpu_platform)."""
ROUTED_EXPERTS_SERVER_FLAG = "--enable-return-routed-experts"
"""Lets requests ask for the experts each token was routed to (MoE routing replay; on CPU it
needs launch/sglang_cpu_platform's unpinned host buffers)."""

GPU_PLACEMENT_FLAGS = ("--base-gpu-id", "--gpu-id-step")
"""Flags that choose a server's GPUs: the embedded fleet sets them (`pipeline.colocation`)."""
MEMORY_FRACTION_FLAG = "--mem-fraction-static"
"""The fraction of a GPU's memory a server takes for weights and KV cache."""
MEMORY_SAVER_FLAG = "--enable-memory-saver"
"""Lets a server release and resume its GPU memory (needs `torch_memory_saver` and CUDA)."""
SERVER_TP_FLAGS = ("--tp", "--tp-size", "--tensor-parallel-size")
"""`sglang.launch_server` flags that set a server's tensor-parallel size (SGLang default 1)."""


def server_flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the first of the flags `names` in a server command line `args`
    (`--flag value` or `--flag=value`); None if absent."""
    for index, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name in names:
            return value if sep else args[index + 1]
    return None


def server_tensor_parallel(server_args: Sequence[str]) -> int:
    """GPUs per server: its TP size from `server_args` (`--tp N`, `--tp-size=N`, ...); 1 if
    absent, as SGLang."""
    return int(server_flag_value(server_args, SERVER_TP_FLAGS) or 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def sglang_server_argv(
    model_path: str | Path, port: int, host: str = "127.0.0.1", extra_args: Sequence[str] = ()
) -> list[str]:
    """The command line of one `sglang.launch_server` (extra flags appended last)."""
    return [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]


def sglang_router_argv(worker_urls: Sequence[str], port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of an `sglang-router` balancing over `worker_urls`; its Prometheus
    exporter binds a free port on `host` (its default, 0.0.0.0:29000, clashes between routers)."""
    return [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(free_port(host)),
        "--policy",
        "round_robin",
        "--worker-urls",
        *worker_urls,
    ]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; (status, body), with status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except (OSError, TimeoutError):
        return 0, b""


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped by PID."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: str | Path, env: dict[str, str] | None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self._env = env
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        """Spawn the process under a group reaper in a new session: the reaper leads the group
        the process and its children share, and kills all of it when this thread exits or the
        process ends (`pipeline.group_reaper`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                [sys.executable, "-I", group_reaper.__file__, *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,
                preexec_fn=functools.partial(exit_with_parent, group_reaper.PARENT_DEATH_SIGNAL),
            )

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, num_lines: int = 30) -> str:
        """The last lines of the log file."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `ready` every 0.5 s until it holds; returns the seconds waited.

        Raises:
            RuntimeError: the process exited first (message holds its log tail).
            TimeoutError: `timeout_s` passed first.
        """
        start = time.monotonic()
        while not ready():
            if not self.is_running():
                raise RuntimeError(
                    f"{self.name} exited with code {self._popen and self._popen.returncode} "
                    f"before {what}; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(
                    f"{self.name} not {what} after {timeout_s:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)
        return time.monotonic() - start

    def signal(self, signum: int) -> None:
        """Send `signum` to the whole process group (no-op once it has exited)."""
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signum)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`, and reap the process."""
        if self._popen is None:
            return
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=grace_s)
        # Children may outlive the leader: kill whatever is left of the group.
        self.signal(signal.SIGKILL)
        self._popen.wait()


def start_router(
    worker_urls: Sequence[str], log_path: str | Path, timeout_s: float = 120.0
) -> tuple[ManagedProcess, str]:
    """Start an `sglang-router` on a free 127.0.0.1 port over `worker_urls`; wait until its
    `/workers` lists every worker (it answers `/health` before they register).

    Returns the process and the router URL. On failure the process is stopped.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    router = ManagedProcess("sglang-router", sglang_router_argv(worker_urls, port), log_path, None)
    router.start()

    def lists_all_workers() -> bool:
        status, body = http_get(f"{url}/workers")
        text = body.decode(errors="replace")
        return status == 200 and all(worker in text for worker in worker_urls)

    try:
        router.wait_until(lists_all_workers, timeout_s, "listing all workers")
    except BaseException:
        router.stop()
        raise
    return router, url
