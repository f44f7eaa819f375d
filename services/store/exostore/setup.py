"""What a store process needs from the node folder: the cell, the data folder, the trait registry.

`load_registry(directory, cell)`: built-in trait types (`exocore.test`, well-known types) plus the
FileDescriptorSet files listed under the cell config's `schemas:` key (paths relative to the cell
folder, `cells/<cell id>/`) and the schemas of the cell's installed apps (`register_app_schemas`).
The CLI uses the same registry to read and print JSON traits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from exocommon.apps import installed_schema_files
from exocommon.config import Cell, NodeDirectory, Role
from exocommon.errors import ExocoreError
from exocommon.process import ConfigurationProblem
from exostore.registry import TraitRegistry


def schema_paths(directory: NodeDirectory, cell: Cell) -> list[Path]:
    base = directory.cell_dir(cell.id)
    return [(base / entry).resolve() if not Path(entry).is_absolute() else Path(entry) for entry in cell.config.schemas]


def load_registry(directory: NodeDirectory, cell: Cell) -> TraitRegistry:
    """Built-ins + the cell's `schemas:` files; ConfigurationProblem naming the file that fails."""
    registry = TraitRegistry()
    for entry, path in zip(cell.config.schemas, schema_paths(directory, cell), strict=True):
        try:
            registry.add_file_descriptor_set(path)
        except ExocoreError as exc:
            raise ConfigurationProblem(f"cell {cell.name}: schemas entry {entry!r} ({path}): {exc}") from None
    register_app_schemas(registry, directory, cell)
    return registry


def register_app_schemas(registry: TraitRegistry, directory: NodeDirectory, cell: Cell) -> None:
    """The schemas of the cell's installed apps (exocommon.apps); a broken app's schema is logged
    and skipped, it does not stop the store."""
    try:
        paths = installed_schema_files(directory, cell.config)
    except ExocoreError as exc:
        logging.getLogger(__name__).warning("cannot list the apps' schemas: %s", exc)
        return
    for path in paths:
        try:
            registry.add_file_descriptor_set(path)
        except ExocoreError as exc:
            logging.getLogger(__name__).warning("app schema %s not registered: %s", path, exc)


@dataclass(frozen=True)
class StoreSetup:
    directory: NodeDirectory
    cell: Cell
    bind: str
    chain_address: str
    data_dir: Path


def load_setup(node_dir: Path, cell_id: str, data_dir: Path | None = None, listen: str | None = None) -> StoreSetup:
    """The node and cell to serve, checked (SPEC 4.6); ConfigurationProblem says why it cannot run."""
    directory = NodeDirectory(node_dir)
    if not directory.node_yaml.exists():
        raise ConfigurationProblem(f"no node in {node_dir} (no node.yaml)")
    try:
        local = directory.load_local_node()
        cells = [c for c in directory.load_cells(local) if str(c.id) == cell_id]
    except ExocoreError as exc:
        raise ConfigurationProblem(str(exc)) from None
    if not cells:
        raise ConfigurationProblem(f"node {local.name} has no cell {cell_id}")
    cell = cells[0]
    roles = cell.local_roles()
    if Role.STORE not in roles:
        raise ConfigurationProblem(f"node {local.name} does not have the store role in cell {cell.name} ({cell.id})")
    if Role.CHAIN not in roles:
        raise ConfigurationProblem(
            f"node {local.name} has the store role but not the chain role in cell {cell.name}: "
            "a store tails its own node's chain service"
        )
    if cell.keypair is None:
        raise ConfigurationProblem(f"Cannot have store role on cell without keypair (cell {cell.name})")
    bind = listen or local.listen_addresses.store
    if not bind:
        raise ConfigurationProblem(f"node {local.name} has no store address (addresses.store in node.yaml)")
    chain_address = local.addresses.chain or local.listen_addresses.chain
    if not chain_address:
        raise ConfigurationProblem(f"node {local.name} has no chain address (addresses.chain in node.yaml)")
    return StoreSetup(directory, cell, bind, chain_address, data_dir or directory.store_dir(cell.id))


__all__ = ["ConfigurationProblem", "StoreSetup", "load_registry", "load_setup", "register_app_schemas", "schema_paths"]
