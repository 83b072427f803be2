"""A real SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd.

    with SlurmCluster(tmp_dir) as cluster:          # waits until `sinfo` shows the nodes idle
        job = cluster.run_job(["sbatch", "script.sh"], cluster.env(), tmp_dir / "job.out")

Everything lives in `tmp_dir`: a fresh munge key, `slurm.conf` (by default one node
`localhost` at 127.0.0.1 with this machine's CPUs and memory from `slurmd -C`; Linux-process
tracking, no task binding, no cgroups, no accounting; ports chosen free), state, spool, PID and
log files. `node_names` with several names starts one `slurmd -N name` per node, all on this
machine, to run multi-node jobs. The daemons run in the foreground as children of the test
(each in its own process group, under `timeout` as a backstop) and are stopped by PID. Every
daemon, and through the submit environment every job process, carries the marker variable
`MEGATRON_DAPO_TEST_SLURM_CLUSTER=<tmp_dir>`; `stop()` kills whatever still carries it and
`leftover_processes()` lets a test check that nothing survived.

Needs the Debian packages in `APT_PACKAGES` (the Makefile's `system-deps` installs them); the
daemons run as root (SlurmUser=root), which is how the test suite runs in its container.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.sglang_server import ManagedProcess, free_port

APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "scontrol", "srun")
MARKER = "MEGATRON_DAPO_TEST_SLURM_CLUSTER"
FINISHED_STATES = frozenset(
    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
)
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def require_installed() -> None:
    """Raise RuntimeError naming the missing programs and the packages that provide them."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_SEARCH_PATH) is None]
    if missing:
        raise RuntimeError(
            f"the SLURM test cluster needs the Debian packages {' '.join(APT_PACKAGES)} "
            f"({' '.join(missing)} not found): run `make system-deps` or "
            f"`apt-get install {' '.join(APT_PACKAGES)}`"
        )


def _command(name: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise FileNotFoundError(name)
    return path


@dataclass(frozen=True)
class NodeHardware:
    """What `slurmd -C` detects on this machine (memory in MiB)."""

    cpus: int
    boards: int
    sockets_per_board: int
    cores_per_socket: int
    threads_per_core: int
    real_memory_mb: int

    @classmethod
    def detect(cls) -> NodeHardware:
        out = subprocess.run(
            [_command("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
        return cls(
            cpus=int(fields["CPUs"]),
            boards=int(fields["Boards"]),
            sockets_per_board=int(fields["SocketsPerBoard"]),
            cores_per_socket=int(fields["CoresPerSocket"]),
            threads_per_core=int(fields["ThreadsPerCore"]),
            real_memory_mb=int(fields["RealMemory"]),
        )


def node_lines(names: Sequence[str], hw: NodeHardware) -> list[str]:
    """`NodeName` lines for `names`, all at 127.0.0.1, each slurmd on its own free port.

    One node gets the detected topology; several share the machine, each declaring an equal
    share of its CPUs (at least one) and memory.
    """
    if len(names) == 1:
        size = (
            f"CPUs={hw.cpus} Boards={hw.boards} SocketsPerBoard={hw.sockets_per_board} "
            f"CoresPerSocket={hw.cores_per_socket} ThreadsPerCore={hw.threads_per_core} "
            f"RealMemory={hw.real_memory_mb}"
        )
    else:
        share = len(names)
        size = f"CPUs={max(1, hw.cpus // share)} RealMemory={hw.real_memory_mb // share}"
    return [
        f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} {size} State=UNKNOWN"
        for name in names
    ]


def slurm_conf(
    workdir: Path, ctld_port: int, munge_socket: Path, nodes: Sequence[str], partition_nodes: str
) -> str:
    """A `slurm.conf` for `nodes` (NodeName lines) whose state and logs all live in `workdir`."""
    return f"""\
ClusterName=dapotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd-%n.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
{chr(10).join(nodes)}
PartitionName=debug Nodes={partition_nodes} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass(frozen=True)
class Job:
    """A finished batch job: its exit code, `scontrol show job` fields, its output file."""

    exit_code: int
    job_id: str
    info: dict[str, str]
    output: str


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, configured, started and stopped in `workdir`.

    All nodes are this machine at 127.0.0.1 (one `slurmd -N <name>` each, on its own port), so
    a test can place job steps on distinct SLURM nodes.
    """

    def __init__(
        self, workdir: Path, node_names: Sequence[str] = ("localhost",), lifetime_s: int = 1800
    ) -> None:
        """`lifetime_s` bounds each daemon (run under `timeout`) should `stop()` never run."""
        self.workdir = Path(workdir)
        self.node_names = tuple(node_names)
        self.lifetime_s = lifetime_s
        self.conf_path = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self._daemons: list[ManagedProcess] = []

    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, sinfo, ...): this cluster, no outer job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_CONF=str(self.conf_path), PATH=_SEARCH_PATH, **{MARKER: str(self.workdir)})
        return env

    def client(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        return subprocess.run(
            [_command(args[0]), *args[1:]],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout_s,
        ).stdout

    def node_states(self) -> list[str]:
        """Each node's state as `sinfo` shows it (`idle`, `idle*`, `down*`, ...)."""
        try:
            out = self.client("sinfo", "--noheader", "--Node", "--format", "%T")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return []
        return out.split()

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...)."""
        line = self.client("scontrol", "--oneliner", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def run_job(
        self,
        command: Sequence[str],
        env: dict[str, str],
        out_file: Path,
        cwd: Path | None = None,
        timeout_s: float = 120.0,
    ) -> Job:
        """Submit with a command that ends in sbatch (`--parsable --output=out_file` inserted
        after its first word) and wait for the job to end; cancelled and TimeoutError after
        `timeout_s`. Polls every 0.5 s (`sbatch --wait` backs off to 32 s between polls)."""
        submitted = subprocess.run(
            [command[0], "--parsable", f"--output={out_file}", *command[1:]],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        job_id = submitted.stdout.strip().split(";")[0]
        if submitted.returncode or not job_id.isdigit():
            raise RuntimeError(f"{command[0]} failed: {submitted.stdout!r} {submitted.stderr!r}")
        deadline = time.monotonic() + timeout_s
        while (info := self.job_info(job_id))["JobState"] not in FINISHED_STATES:
            if time.monotonic() > deadline:
                self.client("scancel", job_id)
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout_s} s")
            time.sleep(0.5)
        output = out_file.read_text() if out_file.exists() else ""
        return Job(int(info["ExitCode"].split(":")[0]), job_id, info, output)

    def start(self, timeout_s: float = 60.0) -> float:
        """Write the configuration, start the daemons, wait for the node; returns seconds taken."""
        require_installed()
        start = time.monotonic()
        for sub in ("munge", "state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.workdir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        nodes = node_lines(self.node_names, NodeHardware.detect())
        self.conf_path.write_text(
            slurm_conf(
                self.workdir, free_port(), self.munge_socket, nodes, ",".join(self.node_names)
            )
        )
        munge_dir, logs = self.workdir / "munge", self.workdir / "log"
        munged = self._spawn(
            "munged",
            "munged",
            "--foreground",
            "--force",  # the socket is in a private (0700) temp dir, which munged refuses
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={munge_dir}/munged.pid",
            f"--seed-file={munge_dir}/munged.seed",
            f"--log-file={logs}/munged.log",
        )
        munged.wait_until(self.munge_socket.exists, timeout_s, "listening")
        ctld = self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.conf_path))
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-f", str(self.conf_path), "-N", node)
        idle = ["idle"] * len(self.node_names)
        ctld.wait_until(lambda: self.node_states() == idle, timeout_s, "showing all nodes idle")
        return time.monotonic() - start

    def _spawn(self, name: str, program: str, *args: str) -> ManagedProcess:
        argv = [_command("timeout"), "--kill-after=10", str(self.lifetime_s), _command(program)]
        process = ManagedProcess(
            name, [*argv, *args], self.workdir / "log" / f"{name}.out", self.env()
        )
        process.start()
        self._daemons.append(process)
        return process

    def leftover_processes(self) -> list[int]:
        """PIDs of live processes that carry this cluster's marker (daemons, steps, jobs)."""
        marker = f"{MARKER}={self.workdir}".encode()
        own = os.getpid()
        return [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit()
            and int(entry.name) != own
            and _environ_has(int(entry.name), marker)
        ]

    def stop(self, grace_s: float = 10.0) -> None:
        """Cancel jobs, stop the daemons by PID, then SIGKILL anything still carrying the marker."""
        if any(d.name == "slurmctld" and d.is_running() for d in self._daemons):
            try:
                jobs = self.client("squeue", "--noheader", "--format", "%A").split()
                if jobs:
                    self.client("scancel", *jobs)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass
        for daemon in reversed(self._daemons):
            daemon.stop(grace_s)
        self._daemons.clear()
        deadline = time.monotonic() + grace_s
        while (pids := self.leftover_processes()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
