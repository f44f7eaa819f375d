"""What every command gets: the node folder and the global options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exocommon.config import NodeDirectory
from exocommon.errors import FailedPrecondition


@dataclass(frozen=True)
class Context:
    node_dir: Path
    discovery_url: str

    @property
    def directory(self) -> NodeDirectory:
        return NodeDirectory(self.node_dir)

    def existing_directory(self) -> NodeDirectory:
        """The node folder, which must hold a node.yaml."""
        directory = self.directory
        if not directory.node_yaml.exists():
            raise FailedPrecondition(
                f"no node in {self.node_dir} (no node.yaml); create one with `exo -d {self.node_dir} node init`"
            )
        return directory
