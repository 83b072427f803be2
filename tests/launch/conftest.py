"""Fixtures for the launcher tests: real SLURM clusters on 127.0.0.1 (see slurm_cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, require_installed


def _running_cluster(workdir: Path, node_names: Sequence[str]) -> Iterator[SlurmCluster]:
    """A started cluster; after the yield, stop it and check that none of its processes live."""
    try:
        require_installed()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    with SlurmCluster(workdir, node_names) as cluster:
        yield cluster
    leftovers = cluster.leftover_processes()
    assert not leftovers, f"SLURM/munge processes survived the teardown: {leftovers}"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node, `localhost`, with all of this machine's CPUs; idle when the test starts."""
    yield from _running_cluster(tmp_path_factory.mktemp("slurm"), ("localhost",))


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Two nodes, `node1` and `node2`, sharing this machine; idle when the test starts."""
    yield from _running_cluster(tmp_path_factory.mktemp("slurm2"), ("node1", "node2"))
