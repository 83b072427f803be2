"""Run one command as a process group's leader that takes the whole group down when it ends.

`ManagedProcess` starts `python -I group_reaper.py COMMAND...` in a session of its own, with
SIGHUP as its parent-death signal (`pipeline.parent_death`). A server's own children (SGLang's
scheduler and detokenizer) ask for SIGKILL on their parent's death only once their start-up
imports have finished; a server killed before then (its owner SIGKILLed while it starts) would
leave them running as orphans for good, ~1 GB each. They stay in the server's process group, so
the leader of that group kills it:

- its parent dies (SIGHUP): SIGKILL to the group, itself included (and to the command's group,
  if the command made one of its own);
- SIGTERM (`ManagedProcess.stop` signals the group): the command shuts down on its own (it is
  forwarded to a command that made a group of its own);
- the command exits: SIGKILL to what is left of the group, then exit with the command's code
  (128 + N for a command killed by signal N).

Standard library only, and run isolated (`-I`): it must start in milliseconds, before the
command, in any environment the command gets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

PARENT_DEATH_SIGNAL = signal.SIGHUP
"""What the reaper receives when its parent exits (set by its starter, see module docstring)."""


def stat_fields(pid: int) -> tuple[str, int, int] | None:
    """`pid`'s state letter (`Z`: zombie), parent PID and process group, from /proc/<pid>/stat;
    None if it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        found = stat_fields(int(stat.parent.name))
        if found is not None and found[0] != "Z" and found[2] == pgid:
            members.append(int(stat.parent.name))
    return members


def _kill_other_members(pgid: int) -> None:
    """SIGKILL every live process in group `pgid` but this one."""
    for pid in group_members(pgid):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run `argv` (the command) in this process group; return its exit code."""
    if not argv:
        print("usage: python -I group_reaper.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    own_group = os.getpgid(0)
    command: subprocess.Popen[bytes] | None = None

    def kill_everything(_signum: int, _frame: object) -> None:
        if command is not None:  # a command that made a group of its own (GNU timeout does)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(command.pid), signal.SIGKILL)
        os.killpg(own_group, signal.SIGKILL)

    def forward_to_command_outside_the_group(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            if command is not None and os.getpgid(command.pid) != own_group:
                command.send_signal(signum)

    signal.signal(PARENT_DEATH_SIGNAL, kill_everything)
    signal.signal(signal.SIGTERM, forward_to_command_outside_the_group)
    command = subprocess.Popen(argv)
    code = command.wait()
    _kill_other_members(own_group)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
