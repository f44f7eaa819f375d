"""Fixtures of the multi-process tests: a started 3-node chain cluster, always killed afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster.create(tmp_path, size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        # Shown by pytest for failing tests only (captured output); before the kill, so a node
        # that exited on its own shows its status.
        print(cluster.logs())
        cluster.close()
