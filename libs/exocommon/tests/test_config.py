"""Node/cell config YAML, validation, editing helpers, node directory and settings (SPEC 1.5-1.8, 9.1)."""

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from exocommon import config as c
from exocommon.config import (
    Cell,
    ChainStorageSettings,
    ConfigError,
    EntityIndexSettings,
    LocalNode,
    MutationIndexSettings,
    NodeDirectory,
    StoreSettings,
)
from exocommon.errors import InvalidArgument
from exocommon.ids import PeerId
from exocommon.keys import Keypair
from exocore.core import config_pb2 as pb

FIXTURE = Path(__file__).parent / "fixtures" / "example_node"
EXAMPLE_CELL_ID = "12D3KooWDZAi5JzpbxQUyZ6kpS2g9idybyZp1i4i1Qu3XgAyZDa1"
EXAMPLE_NODE_PK = "peFdPsQsdqzT2H6cPd3WdU1fGdATDmavh4C17VWWacZTMP"
EXAMPLE_NODE_KP = "ae2oiM2PYznyfqEMPraKbpAuA8LWVhPUiUTgdwjvnwbDjnz9W9FAiE9431NtVjfBaX44nPPoNR8Mv6iYcJdqSfp8eZ"
EXAMPLE_CELL_PK = "pe4joYLBR7R48zZfbLBqHLNvZ97eXAz1zE3pY29h25fGr5"
CLIENT_NODE_PK = "peHdrwp1ZXicF1v7RQRRC4ursqgE1oM9nuVijCmrf74n7E"
NODE_HEADER = f"keypair: {EXAMPLE_NODE_KP}\npublic_key: {EXAMPLE_NODE_PK}\n"


@pytest.fixture
def example_dir(tmp_path) -> NodeDirectory:
    shutil.copytree(FIXTURE, tmp_path / "node")
    return NodeDirectory(tmp_path / "node")


def new_pk() -> str:
    return Keypair.generate().public_key.encode_base58()


def full_node_config() -> pb.LocalNodeConfig:
    """A LocalNodeConfig with every field (and wrapper zero values) set."""
    cfg = c.generate_node_config("full node")
    cell = c.generate_cell_config("inline cell")
    cell.nodes.add(
        node=pb.NodeConfig(
            public_key=cfg.public_key,
            id=cfg.id,
            name="me",
            addresses=pb.NodeAddresses(p2p=["/ip4/1.2.3.4/tcp/1"], chain="me:7001", store="me:7002"),
        ),
        roles=[1, 2, 3],
    )
    cell.nodes.add(node=pb.NodeConfig(public_key=new_pk()), roles=[pb.CellNodeConfig.CHAIN_ROLE])
    app = cell.apps.add(name="app", version="1.0", public_key=new_pk(), package_url="https://x/app.zip")
    app.inline.name = "app"
    app.inline.module.file = "app.wasm"
    app.inline.schemas.add(file="app.fd")
    cfg.cells.add(inline=cell, id=cell.id)
    cfg.cells.add(id=str(PeerId.from_public_key(Keypair.generate().public_key)))
    cfg.addresses.p2p.extend(["/ip4/127.0.0.1/tcp/3330", "/ip4/127.0.0.1/tcp/3341/ws"])
    cfg.addresses.http.append("http://127.0.0.1:8888")
    cfg.addresses.chain = "127.0.0.1:7001"
    cfg.addresses.store = "[::1]:7002"
    cfg.addresses.gateway = "gateway.local:443"
    cfg.addresses.apphost = "localhost:7004"
    cfg.listen_addresses.p2p.append("/ip4/0.0.0.0/tcp/3330")
    cfg.listen_addresses.chain = "0.0.0.0:7001"
    idx = cfg.store.index
    idx.chain_index_min_depth.value = 0
    idx.chain_index_depth_leeway.value = 7
    idx.chain_index_deferred_interval_secs.value = 0
    idx.chain_index_deferred_query_secs.value = 16
    idx.chain_index_deferred_max_secs.value = 2**63
    idx.chain_index_deferred_write_secs.value = 3
    idx.chain_index_deferred_max_pending.value = 5000
    idx.pending_index.indexer_num_threads.value = 3
    idx.pending_index.indexer_heap_size_bytes.value = 40_000_000
    idx.chain_index.entity_mutations_cache_size.value = 0
    idx.garbage_collector.run_interval_secs.value = 14
    idx.garbage_collector.queue_size.value = 501
    cfg.store.query_parallelism.value = 8
    cfg.chain.segment_max_size.value = 1 << 20
    cfg.chain.segment_max_open_mmap.value = 10
    return cfg


# --- the original's example node ---------------------------------------------------------------


def test_example_node_loads_through_node_directory():
    nd = NodeDirectory(FIXTURE)
    assert nd.exists()
    cfg = nd.load_node_config()
    assert cfg.name == "Optional Node Name"
    assert list(cfg.addresses.p2p) == ["/ip4/127.0.0.1/tcp/3330", "/ip4/127.0.0.1/tcp/3341/ws"]
    assert [e.id for e in cfg.cells] == [EXAMPLE_CELL_ID]
    assert cfg.chain.segment_max_open_mmap.value == 10

    cells = nd.load_cell_configs()
    assert len(cells) == 1
    cell = cells[0]
    assert cell.id == EXAMPLE_CELL_ID and cell.name == "vigorously-emerging-elk"
    assert len(cell.nodes) == 2
    first = cell.nodes[0]
    assert first.node.public_key == EXAMPLE_NODE_PK
    assert len(first.node.addresses.p2p) == 2
    assert list(first.roles) == [1, 2, 3]
    assert list(cell.nodes[1].roles) == []
    assert [a.name for a in cell.apps] == ["Some Application"]
    assert cell.apps[0].version == "0.0.1"


def test_example_wrong_and_unknown_keys_are_ignored():
    cfg = NodeDirectory(FIXTURE).load_node_config()
    idx = cfg.store.index
    # `chain_index_deferred_query_interval: 30` / `..._max_interval: 600` are not fields
    assert not idx.HasField("chain_index_deferred_query_secs")
    assert not idx.HasField("chain_index_deferred_max_secs")
    settings = StoreSettings.from_config(cfg.store)
    assert settings.index.chain_index_deferred_query_secs == 15
    assert settings.index.chain_index_deferred_max_secs == 300
    # and nothing unknown survives a save
    text = c.node_config_to_yaml(cfg)
    for key in ("an_unknown_top_level_key", "some_future_setting", "deferred_query_interval"):
        assert key not in text


def test_example_runtime_model(example_dir):
    node = example_dir.load_local_node()
    assert node.node_id == PeerId.from_public_key(node.public_key)
    assert node.root == example_dir.root
    (cell,) = example_dir.load_cells(node)
    assert str(cell.id) == EXAMPLE_CELL_ID
    assert cell.is_full
    assert len(cell.nodes) == 2 and list(cell.nodes)[0] == str(node.node_id)
    assert cell.local_roles() == {1, 2, 3}
    assert cell.has_quorum(1) is False and cell.has_quorum(2) is True
    assert cell.has_quorum(1, c.CHAIN_ROLE) is True


def test_unknown_keys_are_ignored_with_a_warning_naming_the_setting_meant(caplog):
    # SPEC 11 item 13: the original's example node.yaml misspelt two store settings, which then
    # silently kept their defaults. They are still ignored, but each unknown key is said.
    with caplog.at_level(logging.WARNING, logger="exocommon.config"):
        NodeDirectory(FIXTURE).load_node_config()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "store.index.chain_index_deferred_query_interval: unknown key, ignored "
        "(did you mean store.index.chain_index_deferred_query_secs?)" in w
        for w in warnings
    ), warnings
    assert any(
        "store.index.chain_index_deferred_max_interval: unknown key, ignored "
        "(did you mean store.index.chain_index_deferred_max_secs?)" in w
        for w in warnings
    ), warnings
    assert any(w.endswith("an_unknown_top_level_key: unknown key, ignored") for w in warnings), warnings
    # A config written by this project has no unknown key: loading it says nothing.
    text = c.node_config_to_yaml(NodeDirectory(FIXTURE).load_node_config())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exocommon.config"):
        c.node_config_from_yaml(text)
    assert not caplog.records


def test_unknown_keys_ignored_at_every_level():
    text = NODE_HEADER + (
        "bogus: 1\n"
        "addresses: {p2p: [/ip4/1.1.1.1/tcp/1], bogus: [1]}\n"
        "store: {bogus: x, index: {bogus: {a: 1}, chain_index_min_depth: 4}}\n"
        "cells:\n"
        "  - bogus: 1\n"
        f"    inline: {{public_key: {EXAMPLE_CELL_PK}, bogus: 2, nodes: [{{bogus: 3,"
        f" node: {{public_key: {CLIENT_NODE_PK}, bogus: 4}}, roles: [1]}}]}}\n"
    )
    cfg = c.node_config_from_yaml(text)
    assert cfg.store.index.chain_index_min_depth.value == 4
    assert cfg.cells[0].inline.nodes[0].node.public_key == CLIENT_NODE_PK
    assert list(cfg.addresses.p2p) == ["/ip4/1.1.1.1/tcp/1"]


# --- YAML round trips -------------------------------------------------------------------------------


def test_full_node_config_yaml_round_trip():
    cfg = full_node_config()
    text = c.node_config_to_yaml(cfg)
    assert c.node_config_from_yaml(text) == cfg
    data = yaml.safe_load(text)
    # wrappers are plain numbers (uint64 too, not strings), zeros are kept since they are "set"
    assert data["chain"]["segment_max_size"] == 1 << 20
    assert data["store"]["index"]["chain_index_deferred_max_secs"] == 2**63
    assert data["store"]["index"]["chain_index_deferred_interval_secs"] == 0
    assert data["store"]["index"]["chain_index_min_depth"] == 0
    # the oneof is flattened, enums are integers
    inline = data["cells"][0]["inline"]
    assert inline["nodes"][0]["roles"] == [1, 2, 3]
    assert inline["apps"][0]["inline"]["module"] == {"file": "app.wasm"}
    # defaults are omitted
    assert "inline" not in data["cells"][1]
    assert inline["nodes"][1]["roles"] == [1]
    assert set(inline["nodes"][1]["node"]) == {"public_key"}
    assert "http" not in data["listen_addresses"]


def test_empty_defaults_are_omitted():
    cfg = c.generate_node_config("")
    data = yaml.safe_load(c.node_config_to_yaml(cfg))
    assert set(data) == {"keypair", "public_key", "id"}


def test_generated_config_save_reload_equal(tmp_path):
    cfg = c.generate_node_config()
    assert cfg.name and cfg.id == str(PeerId.from_public_key(Keypair.decode_base58(cfg.keypair).public_key))
    path = tmp_path / "sub" / "node.yaml"
    c.save_node_config(cfg, path)
    assert c.load_node_config(path) == cfg
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["node.yaml"]  # no temporary file left behind
    # overwrite keeps it atomic and private
    cfg.name = "renamed"
    c.save_node_config(cfg, path)
    assert c.load_node_config(path).name == "renamed"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_cell_config_file_modes(tmp_path):
    full = c.generate_cell_config()
    c.save_cell_config(full, tmp_path / "full.yaml")
    assert stat.S_IMODE((tmp_path / "full.yaml").stat().st_mode) == 0o600
    public = pb.CellConfig()
    public.CopyFrom(full)
    public.keypair = ""
    c.save_cell_config(public, tmp_path / "public.yaml")
    assert stat.S_IMODE((tmp_path / "public.yaml").stat().st_mode) == 0o644
    assert c.load_cell_config(tmp_path / "public.yaml") == public


def test_save_refuses_invalid_config(tmp_path):
    cfg = c.generate_node_config()
    cfg.public_key = new_pk()
    with pytest.raises(ConfigError, match="does not match"):
        c.save_node_config(cfg, tmp_path / "node.yaml")
    assert not (tmp_path / "node.yaml").exists()


def test_inline_cell_config_loads(tmp_path):
    node_cfg = c.generate_node_config()
    cell = c.generate_cell_config()
    cell.nodes.append(c.create_cell_node_config(node_cfg, [c.CHAIN_ROLE, c.STORE_ROLE]))
    node_cfg.cells.add(inline=cell)
    nd = NodeDirectory(tmp_path)
    nd.save_node_config(node_cfg)
    assert not (tmp_path / "cells").exists()
    (loaded,) = nd.load_cell_configs()
    assert loaded == cell
    assert nd.inlined_node_config() == node_cfg
    (cell_rt,) = nd.load_cells()
    assert cell_rt.local_roles() == {1, 2}


def test_node_directory_save_cell_and_inline(tmp_path):
    nd = NodeDirectory(tmp_path)
    assert not nd.exists()
    node_cfg = c.generate_node_config()
    nd.save_node_config(node_cfg)
    cell = c.generate_cell_config()
    cell.id = ""  # filled on save
    cell_id = nd.save_cell_config(cell)
    assert nd.cell_yaml(cell_id) == tmp_path / "cells" / str(cell_id) / "cell.yaml"
    assert nd.cell_yaml(cell_id).is_file()
    assert nd.chain_dir(cell_id) == tmp_path / "cells" / str(cell_id) / "chain"
    assert nd.store_dir(str(cell_id)).name == "store" and nd.apps_dir(cell_id).name == "apps"
    nd.save_cell_config(cell)  # idempotent: no second entry
    assert [e.id for e in nd.load_node_config().cells] == [str(cell_id)]
    (loaded,) = nd.load_cell_configs()
    assert loaded.id == str(cell_id) and loaded.public_key == cell.public_key

    inlined = nd.inlined_node_config()
    assert inlined.cells[0].id == str(cell_id)
    assert inlined.cells[0].inline == loaded
    # the inlined YAML is self-contained: it loads in a directory without cells/
    other = NodeDirectory(tmp_path / "other")
    other.save_node_config(inlined)
    assert other.load_cell_configs() == [loaded]


def test_save_cell_config_replaces_inline_entry(tmp_path):
    nd = NodeDirectory(tmp_path)
    node_cfg = c.generate_node_config()
    cell = c.generate_cell_config()
    node_cfg.cells.add(inline=cell)
    nd.save_node_config(node_cfg)
    cell.name = "from file"
    nd.save_cell_config(cell)
    cells = nd.load_node_config().cells
    assert len(cells) == 1 and not cells[0].HasField("inline") and cells[0].id == cell.id
    assert nd.load_cell_configs()[0].name == "from file"


def test_missing_cell_yaml_names_the_cell(example_dir):
    shutil.rmtree(example_dir.cell_dir(EXAMPLE_CELL_ID))
    with pytest.raises(ConfigError, match=EXAMPLE_CELL_ID) as e:
        example_dir.load_cell_configs()
    assert e.value.field == "cells[0].id"


def test_cell_yaml_in_wrong_folder(example_dir):
    other = c.generate_cell_config()
    other.id = ""
    c.save_cell_config(other, example_dir.cell_yaml(EXAMPLE_CELL_ID))
    with pytest.raises(ConfigError, match=f"for cell {EXAMPLE_CELL_ID}"):
        example_dir.load_cell_configs()


def test_cell_dir_rejects_path_traversal(tmp_path):
    with pytest.raises(InvalidArgument):
        NodeDirectory(tmp_path).cell_dir("../../etc")


# --- errors ---------------------------------------------------------------------------------------


def cell_yaml(nodes: str = "", extra: str = "") -> str:
    head = f"public_key: {EXAMPLE_CELL_PK}\n{extra}"
    return f"{head}nodes:\n{nodes}" if nodes else head


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        (
            NODE_HEADER + "store: {index: {chain_index_min_depth: abc}}\n",
            "store.index.chain_index_min_depth",
            "expected an unsigned integer, got 'abc'",
        ),
        (NODE_HEADER + "store: {index: {chain_index_min_depth: -1}}\n", "store.index.chain_index_min_depth", "-1"),
        (NODE_HEADER + "store: {index: {chain_index_min_depth: 1.5}}\n", "store.index.chain_index_min_depth", "1.5"),
        (NODE_HEADER + "store: {query_parallelism: true}\n", "store.query_parallelism", "got true"),
        (NODE_HEADER + "store: {query_parallelism: 4294967296}\n", "store.query_parallelism", "out of range"),
        (NODE_HEADER + "store: {query_parallelism: 0}\n", "store.query_parallelism", "at least 1"),
        (NODE_HEADER + "chain: {segment_max_open_mmap: 0}\n", "chain.segment_max_open_mmap", "at least 1"),
        (NODE_HEADER + "addresses: {p2p: /ip4/1.2.3.4/tcp/1}\n", "addresses.p2p", "expected a list"),
        (NODE_HEADER + "addresses: [1]\n", "addresses", "expected a mapping"),
        (NODE_HEADER + "name: {a: 1}\n", "name", "expected a string"),
        (f"public_key: {EXAMPLE_NODE_PK}\n", "keypair", "required"),
        (f"keypair: {EXAMPLE_NODE_KP}\n", "public_key", "required"),
        (f"keypair: {EXAMPLE_NODE_KP}\npublic_key: xebad\n", "public_key", "must start with 'p'"),
        (f"keypair: {EXAMPLE_NODE_KP}\npublic_key: pe0OIl\n", "public_key", "base58"),
        (f"keypair: aebad\npublic_key: {EXAMPLE_NODE_PK}\n", "keypair", "keypair"),
        (f"keypair: {EXAMPLE_NODE_KP}\npublic_key: {CLIENT_NODE_PK}\n", "keypair", "does not match public_key"),
        (NODE_HEADER + f"id: {EXAMPLE_CELL_ID}\n", "id", "not the id of the public key"),
        (NODE_HEADER + "addresses: {chain: localhost}\n", "addresses.chain", "host:port"),
        (NODE_HEADER + "addresses: {store: 'localhost:0'}\n", "addresses.store", "host:port"),
        (NODE_HEADER + "listen_addresses: {gateway: 'localhost:65536'}\n", "listen_addresses.gateway", "65536"),
        (NODE_HEADER + "addresses: {apphost: 'http://x:1'}\n", "addresses.apphost", "host:port"),
        (NODE_HEADER + "cells: [{}]\n", "cells[0]", "needs an `id`"),
        (NODE_HEADER + "cells: [{id: nope}]\n", "cells[0].id", "peer id"),
        (
            NODE_HEADER + f"cells: [{{id: {EXAMPLE_CELL_ID}}}, {{id: {EXAMPLE_CELL_ID}}}]\n",
            "cells[1]",
            "already listed as cells[0]",
        ),
        (
            NODE_HEADER + f"cells: [{{inline: {{public_key: {EXAMPLE_CELL_PK}, nodes: [{{roles: [1]}}]}}}}]\n",
            "cells[0].inline.nodes[0].node.public_key",
            "required",
        ),
        (
            NODE_HEADER + "cells: [{id: 12D3KooWSTE7Z99EuWWWKzvq41wQgexgAZ4SNqsPTK6E9qozxiqA, inline: {}}]\n",
            "cells[0].inline.public_key",
            "required",
        ),
    ],
)
def test_node_config_errors_name_the_field(text, field, fragment):
    with pytest.raises(ConfigError) as e:
        c.node_config_from_yaml(text)
    err = e.value
    assert isinstance(err, InvalidArgument) and err.grpc_status == "INVALID_ARGUMENT"
    assert err.field == field
    assert str(err).startswith(f"node.yaml: {field}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        (
            cell_yaml(
                f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n    roles: [1]\n"
                f"  - node: {{public_key: {EXAMPLE_NODE_PK}}}\n    roles: [2, 0]\n"
            ),
            "nodes[1].roles[1]",
            "role 0 (INVALID_ROLE) is not allowed",
        ),
        (
            cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n    roles: [4]\n"),
            "nodes[0].roles[0]",
            "role 4 is not a known role",
        ),
        (
            cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n    roles: [chain]\n"),
            "nodes[0].roles[0]",
            "expected an enum number",
        ),
        (cell_yaml("  - node: {public_key: peBAD}\n"), "nodes[0].node.public_key", "public key"),
        (cell_yaml("  - roles: [1]\n"), "nodes[0].node.public_key", "required"),
        (
            cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}, id: {EXAMPLE_CELL_ID}}}\n"),
            "nodes[0].node.id",
            "not the id",
        ),
        (
            cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}, addresses: {{chain: 'a:b'}}}}\n"),
            "nodes[0].node.addresses.chain",
            "host:port",
        ),
        (
            cell_yaml(
                f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n    roles: [1, 3]\n"
                f"  - node: {{public_key: {EXAMPLE_NODE_PK}}}\n    roles: [2, 3]\n"
            ),
            "nodes[1].roles",
            "only one node of a cell may have APP_HOST_ROLE",
        ),
        (
            cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n  - node: {{public_key: {CLIENT_NODE_PK}}}\n"),
            "nodes[1].node.public_key",
            "listed twice",
        ),
        (cell_yaml("  - null\n"), "nodes[0]", "null"),
        ("name: x\n", "public_key", "required"),
        (cell_yaml(extra=f"keypair: {EXAMPLE_NODE_KP}\n"), "keypair", "does not match public_key"),
        (cell_yaml(extra="keypair: peX\n"), "keypair", "must start with 'a'"),
        (cell_yaml(extra="id: 12D3KooWSTE7Z99EuWWWKzvq41wQgexgAZ4SNqsPTK6E9qozxiqA\n"), "id", "not the id"),
        (cell_yaml(extra="apps: [{name: a, public_key: nope}]\n"), "apps[0].public_key", "public key"),
    ],
)
def test_cell_config_errors_name_the_field(text, field, fragment):
    with pytest.raises(ConfigError) as e:
        c.cell_config_from_yaml(text)
    assert e.value.field == field
    assert str(e.value).startswith(f"cell.yaml: {field}: ")
    assert fragment in str(e.value)


def test_yaml_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        c.node_config_from_yaml("a: [1, 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got a list"):
        c.cell_config_from_yaml("- 1\n")
    with pytest.raises(ConfigError, match="public_key: required"):
        c.cell_config_from_yaml("")
    with pytest.raises(ConfigError, match="does not exist") as e:
        c.load_node_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(NODE_HEADER + "store: {index: {chain_index_min_depth: abc}}\n")
    with pytest.raises(ConfigError) as e:
        c.load_node_config(path)
    assert str(e.value) == f"{path}: store.index.chain_index_min_depth: expected an unsigned integer, got 'abc'"
    assert e.value.source == str(path)


def test_lenient_scalars():
    cfg = c.node_config_from_yaml(
        NODE_HEADER + "name: 1234\nstore: {index: {chain_index_min_depth: '5'}}\naddresses: ~\ncells: ~\n"
    )
    assert cfg.name == "1234"
    assert cfg.store.index.chain_index_min_depth.value == 5
    assert not cfg.HasField("addresses")
    cell = c.cell_config_from_yaml(cell_yaml(f"  - node: {{public_key: {CLIENT_NODE_PK}}}\n    roles: [STORE_ROLE]\n"))
    assert list(cell.nodes[0].roles) == [2]


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:1", True),
        ("[::1]:65535", True),
        ("chain-0.chain.default.svc.cluster.local:7001", True),
        ("localhost", False),
        (":50051", False),
        ("localhost:0", False),
        ("localhost:65536", False),
        ("localhost:http", False),
        ("::1:50051", False),
        ("dns:///x:1", False),
        ("a b:1", False),
    ],
)
def test_grpc_address_shape(addr, ok):
    assert c.is_grpc_address(addr) is ok


# --- editing helpers ------------------------------------------------------------------------------


def test_add_cell_dedups_by_id():
    cfg = c.generate_node_config()
    a, b = c.generate_cell_config(), c.generate_cell_config()
    c.add_cell(cfg, pb.NodeCellConfig(id=a.id))
    c.add_cell(cfg, pb.NodeCellConfig(id=b.id))
    c.add_cell(cfg, pb.NodeCellConfig(id=a.id))
    assert [e.id for e in cfg.cells] == [b.id, a.id]  # removed then appended
    # an inline entry of the same cell (without `id`) replaces it too
    a.id = ""
    c.add_cell(cfg, pb.NodeCellConfig(inline=a))
    assert len(cfg.cells) == 2 and cfg.cells[1].HasField("inline")
    # two id-less inline cells do not replace each other
    other = c.generate_cell_config()
    other.id = ""
    c.add_cell(cfg, pb.NodeCellConfig(inline=other))
    assert len(cfg.cells) == 3


def test_add_node_replaces_by_public_key_else_appends():
    cell = c.generate_cell_config()
    pk1, pk2 = new_pk(), new_pk()
    c.add_node(cell, pb.CellNodeConfig(node=pb.NodeConfig(public_key=pk1, name="old"), roles=[1]))
    c.add_node(cell, pb.CellNodeConfig(node=pb.NodeConfig(public_key=pk2, name="two")))
    c.add_node(cell, pb.CellNodeConfig(node=pb.NodeConfig(public_key=pk1, name="new"), roles=[1, 2]))
    assert [(n.node.public_key, n.node.name, list(n.roles)) for n in cell.nodes] == [
        (pk1, "new", [1, 2]),
        (pk2, "two", []),
    ]
    c.add_node(cell, pb.CellNodeConfig(roles=[1]))  # no node: ignored
    assert len(cell.nodes) == 2


def test_add_application_dedups_by_public_key():
    cell = c.generate_cell_config()
    pk1, pk2 = new_pk(), new_pk()
    c.add_application(cell, pb.CellApplicationConfig(name="a", version="1", public_key=pk1))
    c.add_application(cell, pb.CellApplicationConfig(name="b", version="1", public_key=pk2))
    c.add_application(cell, pb.CellApplicationConfig(name="a", version="2", public_key=pk1))
    assert [(a.name, a.version) for a in cell.apps] == [("a", "2"), ("b", "1")]


def test_create_cell_node_config():
    cfg = c.generate_node_config("my node")
    cfg.addresses.p2p.append("/ip4/1.2.3.4/tcp/3330")
    cfg.addresses.store = "1.2.3.4:7002"
    cfg.listen_addresses.p2p.append("/ip4/0.0.0.0/tcp/3330")
    entry = c.create_cell_node_config(cfg, [c.CHAIN_ROLE, c.STORE_ROLE])
    assert entry.node.public_key == cfg.public_key
    assert entry.node.id == cfg.id
    assert entry.node.name == "my node"
    assert entry.node.addresses == cfg.addresses  # public, not listen, addresses
    assert list(entry.roles) == [1, 2]
    # it round trips through the YAML exchanged on join
    assert c.cell_node_config_from_yaml(c.cell_node_config_to_yaml(entry)) == entry
    # empty id/name are filled
    cfg.id, cfg.name = "", ""
    entry = c.create_cell_node_config(cfg, [])
    assert entry.node.id == str(PeerId.from_str(entry.node.id)) and entry.node.name
    with pytest.raises(ConfigError, match="INVALID_ROLE"):
        c.create_cell_node_config(cfg, [0])


# --- settings -------------------------------------------------------------------------------------


def test_settings_defaults():
    s = StoreSettings.from_config(None)
    assert s == StoreSettings.from_config(pb.NodeStoreConfig()) == StoreSettings()
    assert s.query_parallelism == 4
    i = s.index
    assert (i.chain_index_min_depth, i.chain_index_depth_leeway) == (3, 10)
    assert (
        i.chain_index_deferred_interval_secs,
        i.chain_index_deferred_query_secs,
        i.chain_index_deferred_max_secs,
        i.chain_index_deferred_write_secs,
        i.chain_index_deferred_max_pending,
    ) == (5, 15, 300, 2, 100_000)
    for m in (i.pending_index, i.chain_index):
        assert m == MutationIndexSettings(1, 100_000_000, 5000)  # one writer thread, 100 MB: see config.py
    assert (i.garbage_collector.run_interval_secs, i.garbage_collector.queue_size) == (13, 500)
    ch = ChainStorageSettings.from_config(None)
    assert (ch.segment_max_size, ch.segment_max_open_mmap) == (200 * 1024 * 1024, 20)
    assert ChainStorageSettings.from_config(pb.ChainConfig()) == ch


def test_settings_overrides():
    cfg = full_node_config()
    s = StoreSettings.from_config(cfg.store)
    assert s.query_parallelism == 8
    assert s.index.chain_index_min_depth == 0  # explicit zero is not the default
    assert s.index.chain_index_depth_leeway == 7
    assert s.index.chain_index_deferred_query_secs == 16
    assert s.index.chain_index_deferred_max_secs == 2**63
    assert (s.index.chain_index_deferred_write_secs, s.index.chain_index_deferred_max_pending) == (3, 5000)
    assert s.index.pending_index == MutationIndexSettings(3, 40_000_000, 5000)
    assert s.index.chain_index == MutationIndexSettings(1, 100_000_000, 0)
    assert (s.index.garbage_collector.run_interval_secs, s.index.garbage_collector.queue_size) == (14, 501)
    ch = ChainStorageSettings.from_config(cfg.chain)
    assert (ch.segment_max_size, ch.segment_max_open_mmap) == (1 << 20, 10)


def test_deferred_interval_zero_disables_deferral():
    cfg = c.node_config_from_yaml(NODE_HEADER + "store: {index: {chain_index_deferred_interval_secs: 0}}\n")
    assert EntityIndexSettings.from_config(cfg.store.index).chain_index_deferred_interval_secs is None
    # 0 survives a YAML round trip (the wrapper is set) and is not replaced by the default 5
    again = c.node_config_from_yaml(c.node_config_to_yaml(cfg))
    assert StoreSettings.from_config(again.store).index.chain_index_deferred_interval_secs is None
    cfg = c.node_config_from_yaml(NODE_HEADER + "store: {index: {chain_index_deferred_interval_secs: 9}}\n")
    assert EntityIndexSettings.from_config(cfg.store.index).chain_index_deferred_interval_secs == 9


# --- runtime node ---------------------------------------------------------------------------------


def test_local_node_from_config():
    cfg = c.generate_node_config("")
    cfg.addresses.p2p.append("/ip4/1.2.3.4/tcp/3330")
    cfg.addresses.chain = "1.2.3.4:7001"
    node = LocalNode.from_config(cfg)
    assert node.name == node.public_key.generate_name()
    assert node.keypair.public_key == node.public_key
    assert str(node.node_id) == cfg.id
    assert node.listen_addresses == node.addresses  # fallback when empty
    cfg.listen_addresses.chain = "0.0.0.0:7001"
    node2 = LocalNode.from_config(cfg)
    assert node2.listen_addresses.chain == "0.0.0.0:7001"
    assert node2.listen_addresses.p2p == ("/ip4/1.2.3.4/tcp/3330",)  # per-field fallback
    assert node2 == node and hash(node2) == hash(node)  # equality by id
    assert node != LocalNode.generate()
    cfg.name = "named"
    assert LocalNode.from_config(cfg).name == "named"
    with pytest.raises(ConfigError):
        LocalNode.from_config(pb.LocalNodeConfig())


def test_cell_from_config_validates():
    node = LocalNode.generate()
    with pytest.raises(ConfigError, match="public_key: required"):
        Cell.from_config(pb.CellConfig(), node)
