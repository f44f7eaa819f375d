"""Cell runtime model: nodes map, roles and quorum (SPEC 1.4, 9.1)."""

import pytest

from exocommon import config as c
from exocommon.config import Cell, CellNode, LocalNode
from exocore.core import config_pb2 as pb


def node_entry(pk: str, *roles: int, name: str = "") -> pb.CellNodeConfig:
    return pb.CellNodeConfig(node=pb.NodeConfig(public_key=pk, name=name), roles=list(roles))


def other_pk() -> str:
    return LocalNode.generate().public_key.encode_base58()


def make_cell(local: LocalNode, *entries: pb.CellNodeConfig, full: bool = True) -> Cell:
    cfg = c.generate_cell_config("")
    if not full:
        cfg.keypair = ""
    cfg.nodes.extend(entries)
    return Cell.from_config(cfg, local)


@pytest.fixture
def local() -> LocalNode:
    return LocalNode.generate("local")


def test_quorum_one_node(local):
    cell = make_cell(local)
    assert len(cell.nodes) == 1
    assert cell.has_quorum(0) is False
    assert cell.has_quorum(1) is True
    # role filter with no role holder: never a quorum
    assert cell.has_quorum(0, c.CHAIN_ROLE) is False
    assert cell.has_quorum(1, c.CHAIN_ROLE) is False


def test_quorum_two_nodes(local):
    cell = make_cell(local, node_entry(other_pk()))
    assert len(cell.nodes) == 2
    assert cell.has_quorum(1) is False
    assert cell.has_quorum(2) is True


def test_quorum_three_nodes(local):
    cell = make_cell(local, node_entry(other_pk()), node_entry(other_pk()))
    assert len(cell.nodes) == 3
    assert cell.has_quorum(0) is False
    assert cell.has_quorum(1) is False
    assert cell.has_quorum(2) is True
    assert cell.has_quorum(3) is True


def test_quorum_three_nodes_two_with_chain_role(local):
    cell = make_cell(local, node_entry(other_pk(), c.CHAIN_ROLE), node_entry(other_pk(), c.CHAIN_ROLE, c.STORE_ROLE))
    assert len(cell.nodes) == 3
    assert len(cell.nodes_with_role(c.CHAIN_ROLE)) == 2
    assert cell.has_quorum(1, c.CHAIN_ROLE) is False
    assert cell.has_quorum(2, c.CHAIN_ROLE) is True
    assert cell.has_quorum(1, c.STORE_ROLE) is True  # 1 store node
    assert cell.has_quorum(1) is False  # 3 nodes overall


def test_local_node_not_listed_has_no_roles(local):
    other = other_pk()
    cell = make_cell(local, node_entry(other, 1, 2, 3, name="other"))
    assert list(cell.nodes)[0] == str(local.node_id)  # inserted first
    assert cell.local_cell_node.roles == frozenset()
    assert cell.local_roles() == frozenset()
    assert cell.local_cell_node.name == "local"
    assert [n.name for n in cell.nodes_with_role(c.APP_HOST_ROLE)] == ["other"]


def test_local_node_listed_gets_its_configured_roles(local):
    me = local.public_key.encode_base58()
    cell = make_cell(local, node_entry(other_pk(), 1), node_entry(me, 1, 2, name="me in the cell"))
    assert len(cell.nodes) == 2  # the config entry overwrote the local one
    assert cell.local_roles() == {c.CHAIN_ROLE, c.STORE_ROLE}
    assert cell.local_cell_node.name == "me in the cell"
    assert list(cell.nodes)[0] == str(local.node_id)  # still first
    assert cell.has_quorum(2, c.CHAIN_ROLE) is True
    assert cell.has_quorum(1, c.CHAIN_ROLE) is False


def test_local_node_config_from_create_cell_node_config(local):
    entry = c.create_cell_node_config(local.config, [c.CHAIN_ROLE, c.STORE_ROLE, c.APP_HOST_ROLE])
    cell = make_cell(local, entry)
    assert len(cell.nodes) == 1
    assert cell.local_roles() == {1, 2, 3}
    assert cell.local_cell_node == CellNode.from_config(entry)


def test_cell_identity_and_fullness(local):
    full = make_cell(local)
    assert full.is_full and full.keypair is not None
    assert full.keypair.public_key == full.public_key
    assert str(full.id) == full.config.id
    assert full.name == full.public_key.generate_name()  # config name empty -> generated
    public = make_cell(local, full=False)
    assert not public.is_full and public.keypair is None
    cfg = c.generate_cell_config("named cell")
    assert Cell.from_config(cfg, local).name == "named cell"


def test_cell_node_fields(local):
    pk = other_pk()
    entry = node_entry(pk, 2)
    entry.node.addresses.p2p.append("/ip4/10.0.0.2/tcp/3330")
    entry.node.addresses.store = "10.0.0.2:7002"
    cell = make_cell(local, entry)
    node = next(n for n in cell.nodes.values() if n.public_key.encode_base58() == pk)
    assert node.name == node.public_key.generate_name()
    assert node.addresses.p2p == ("/ip4/10.0.0.2/tcp/3330",)
    assert node.addresses.store == "10.0.0.2:7002"
    assert node.addresses.to_config() == entry.node.addresses
    assert node.has_role(c.STORE_ROLE) and not node.has_role(c.CHAIN_ROLE)
    assert cell.nodes[str(node.node_id)] is node


def test_cell_config_is_copied(local):
    cfg = c.generate_cell_config()
    cell = Cell.from_config(cfg, local)
    cfg.name = "changed later"
    assert cell.config.name != "changed later"


def test_invalid_cell_config_rejected(local):
    cfg = c.generate_cell_config()
    cfg.nodes.append(node_entry(other_pk(), 0))
    with pytest.raises(c.ConfigError, match=r"nodes\[0\]\.roles\[0\]: role 0 \(INVALID_ROLE\)"):
        Cell.from_config(cfg, local)
