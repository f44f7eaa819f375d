"""What the store process loads from the node folder: the cell checks and the `schemas:` registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from exocommon.config import NodeDirectory, Role, create_cell_node_config, generate_cell_config, generate_node_config
from exocore.store import options_pb2
from exostore.setup import ConfigurationProblem, load_registry, load_setup


def note_schema() -> bytes:
    """A FileDescriptorSet with `my.notes.Note { string title = 1 [(exocore.text) = true]; }`."""
    file = descriptor_pb2.FileDescriptorProto(
        name="my/notes.proto", package="my.notes", syntax="proto3", dependency=["exocore/store/options.proto"]
    )
    message = file.message_type.add(name="Note")
    field = message.field.add(
        name="title",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    field.options.Extensions[options_pb2.text] = True
    options_file = descriptor_pb2.FileDescriptorProto()
    options_pb2.DESCRIPTOR.CopyToProto(options_file)
    return descriptor_pb2.FileDescriptorSet(file=[options_file, file]).SerializeToString()


def make_node(tmp_path, roles=(Role.CHAIN, Role.STORE), keypair=True, schemas=()):
    directory = NodeDirectory(tmp_path / "node")
    directory.root.mkdir()
    node = generate_node_config("n")
    node.addresses.chain = "127.0.0.1:1"
    node.addresses.store = "127.0.0.1:2"
    directory.save_node_config(node)
    cell = generate_cell_config("c")
    cell.nodes.append(create_cell_node_config(node, list(roles)))
    cell.schemas.extend(schemas)
    directory.save_cell_config(cell)
    if not keypair:
        saved = directory.load_cell_configs()[0]
        saved.keypair = ""
        directory.save_cell_config(saved)
    return directory, cell.id


def test_setup_of_a_full_cell_with_store_and_chain_roles(tmp_path):
    directory, cell_id = make_node(tmp_path)
    setup = load_setup(directory.root, cell_id)
    assert setup.bind == "127.0.0.1:2" and setup.chain_address == "127.0.0.1:1"
    assert setup.data_dir == directory.store_dir(cell_id)
    other = load_setup(directory.root, cell_id, tmp_path / "replica2", "127.0.0.1:9")
    assert other.data_dir == tmp_path / "replica2" and other.bind == "127.0.0.1:9"


@pytest.mark.parametrize(
    ("roles", "keypair", "message"),
    [
        ((Role.CHAIN,), True, "does not have the store role"),
        ((Role.STORE,), True, "not the chain role"),
        ((Role.CHAIN, Role.STORE), False, "Cannot have store role on cell without keypair"),
    ],
)
def test_setup_refusals(tmp_path, roles, keypair, message):
    directory, cell_id = make_node(tmp_path, roles, keypair)
    with pytest.raises(ConfigurationProblem, match=message):
        load_setup(directory.root, cell_id)


def test_the_store_process_exits_2_when_it_cannot_run(tmp_path):
    directory, cell_id = make_node(tmp_path, (Role.CHAIN,))
    result = subprocess.run(
        [sys.executable, "-m", "exostore", "--dir", str(directory.root), "--cell", cell_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "store role" in result.stderr


def test_cell_schemas_are_loaded_relative_to_the_cell_folder(tmp_path):
    directory, cell_id = make_node(tmp_path, schemas=["schemas/notes.fds"])
    (directory.cell_dir(cell_id) / "schemas").mkdir()
    (directory.cell_dir(cell_id) / "schemas" / "notes.fds").write_bytes(note_schema())
    cell = directory.load_cells()[0]
    registry = load_registry(directory, cell)
    assert registry.message_descriptor("my.notes.Note") is not None
    assert registry.message_descriptor("exocore.test.TestMessage") is not None


def test_a_missing_schema_file_is_a_configuration_problem(tmp_path):
    directory, _ = make_node(tmp_path, schemas=["nowhere.fds"])
    with pytest.raises(ConfigurationProblem, match="schemas entry 'nowhere.fds'"):
        load_registry(directory, directory.load_cells()[0])
