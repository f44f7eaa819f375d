"""model.py: operations, batches and their signatures; blocks, genesis and block validation."""

from __future__ import annotations

import pytest

from exochain.model import (
    BlockHeaderView,
    BlockView,
    InvalidBlock,
    InvalidOperation,
    OperationKind,
    SignatureChecker,
    SignedOp,
    build_block_header,
    build_genesis,
    new_block_proposal,
    new_block_refuse,
    new_block_sign,
    new_entry,
    sign_block,
    sign_operations,
    sign_payload,
    validate_block,
    validate_genesis,
)
from exocommon import canonical
from exocommon.ids import PeerId
from exocommon.keys import Keypair, PublicKey
from exocore.chain.v1 import chain_pb2


def keypair(n: int) -> Keypair:
    return Keypair.from_seed(bytes([n]) * 32)


def node_id(kp: Keypair) -> str:
    return str(PeerId.from_public_key(kp.public_key))


CELL_KP = keypair(100)
CELL_ID = node_id(CELL_KP)
NODE_KPS = [keypair(1), keypair(2), keypair(3)]
NODE_IDS = [node_id(kp) for kp in NODE_KPS]
CHAIN_KEYS: dict[str, PublicKey] = {nid: kp.public_key for nid, kp in zip(NODE_IDS, NODE_KPS, strict=True)}
OUTSIDER_KP = keypair(9)
OUTSIDER_ID = node_id(OUTSIDER_KP)


def quorum_of_3(count: int) -> bool:
    return count > 3 // 2


def entries(first_id: int, count: int, node: int = 0, size: int = 20) -> list[SignedOp]:
    ops = [new_entry(first_id + i, NODE_IDS[node], bytes([i % 256]) * size) for i in range(count)]
    return sign_operations(ops, NODE_KPS[node])


def block_after(previous: BlockHeaderView, ops: list[SignedOp], signers: list[int], proposal_id: int) -> BlockView:
    head = build_block_header(CELL_ID, previous, proposal_id, NODE_IDS[0], ops)
    block = BlockView(head, tuple(ops))
    return block.with_signatures(sign_block(head, NODE_IDS[i], NODE_KPS[i]) for i in signers)


def resigned(head: BlockHeaderView, **changes: object) -> BlockHeaderView:
    """A header with some fields changed, re-serialised (so its hash is its own)."""
    header = chain_pb2.BlockHeader()
    header.CopyFrom(head.header)
    for name, value in changes.items():
        if name == "operations_header":
            del header.operations_header[:]
            header.operations_header.extend(value)  # type: ignore[arg-type]
        else:
            setattr(header, name, value)
    return BlockHeaderView.parse(canonical.deterministic_bytes(header))


def quorum_signed(head: BlockHeaderView, ops: tuple[SignedOp, ...] | list[SignedOp]) -> BlockView:
    return BlockView(head, tuple(ops), tuple(sign_block(head, NODE_IDS[i], NODE_KPS[i]) for i in (0, 1)))


@pytest.fixture(scope="module")
def genesis() -> BlockView:
    return build_genesis(CELL_ID, CELL_KP)


# -- genesis ----------------------------------------------------------------------------------


def test_genesis_is_signed_by_the_cell_key(genesis):
    assert genesis.offset == 0 and genesis.height == 1 and genesis.operations == ()
    assert genesis.header.previous_hash == b"" and genesis.header.proposed_operation_id == 0
    assert genesis.header.cell_id == CELL_ID
    assert [s.node_id for s in genesis.signatures] == [CELL_ID]
    validate_genesis(genesis, CELL_ID, CELL_KP.public_key)
    payload = canonical.genesis_payload(genesis.head.header_bytes)
    assert CELL_KP.public_key.verify(payload, genesis.signatures[0].signature)
    assert genesis.next_offset == len(genesis.head.header_bytes)


def test_genesis_signed_by_another_key_is_rejected(genesis):
    forged = build_genesis(CELL_ID, OUTSIDER_KP)
    with pytest.raises(InvalidBlock, match="not signed by the cell key"):
        validate_genesis(forged, CELL_ID, CELL_KP.public_key)
    # The real cell key does not help a genesis signed by another key either.
    with pytest.raises(InvalidBlock, match="not signed"):
        validate_genesis(genesis, CELL_ID, OUTSIDER_KP.public_key)


def test_genesis_of_another_cell_is_rejected():
    other_cell_kp = keypair(101)
    other = build_genesis(node_id(other_cell_kp), other_cell_kp)
    with pytest.raises(InvalidBlock, match="for cell"):
        validate_genesis(other, CELL_ID, CELL_KP.public_key)
    # Same header, signature by the right key but under another cell id: the signer id must be the cell.
    with pytest.raises(InvalidBlock):
        validate_genesis(other, node_id(other_cell_kp), CELL_KP.public_key)


def test_genesis_must_be_first_and_empty(genesis):
    moved = BlockView(resigned(genesis.head, height=2), (), genesis.signatures)
    with pytest.raises(InvalidBlock, match="offset 0, height 1"):
        validate_genesis(moved, CELL_ID, CELL_KP.public_key)


# -- operations -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_batch_signature_verifies_every_operation(batch_size):
    ops = entries(1000, batch_size)
    roots = {op.merkle_root() for op in ops}
    assert len(roots) == 1 and None not in roots
    assert len({op.signature for op in ops}) == 1
    assert [op.batch_index for op in ops] == list(range(batch_size))
    assert all(op.batch_size == batch_size for op in ops)

    lookups: list[str] = []

    def node_keys(nid: str) -> PublicKey | None:
        lookups.append(nid)
        return CHAIN_KEYS.get(nid)

    checker = SignatureChecker(node_keys)
    assert all(checker.verify(op) for op in ops)
    # One Ed25519 verification (one key lookup) for the whole batch.
    assert lookups == [NODE_IDS[0]]
    assert all(checker.verify(op) for op in ops)
    assert lookups == [NODE_IDS[0]]


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_tampered_operation_bytes_fail(batch_size):
    ops = entries(2000, batch_size, size=8)
    target = ops[-1]
    proto = target.to_proto()
    data = bytearray(proto.operation_bytes)
    data[-1] ^= 0x01  # last byte of the entry data: still parses
    proto.operation_bytes = bytes(data)
    tampered = SignedOp.from_proto(proto)
    assert tampered.entry_data != target.entry_data
    checker = SignatureChecker(CHAIN_KEYS.get)
    assert not checker.verify(tampered)
    # The untouched operations still verify, also after the failure (nothing bad is cached).
    assert all(checker.verify(op) for op in ops)
    assert not checker.verify(tampered)


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_tampered_signature_fails(batch_size):
    ops = entries(3000, batch_size)
    proto = ops[0].to_proto()
    signature = bytearray(proto.signature)
    signature[10] ^= 0x80
    proto.signature = bytes(signature)
    tampered = SignedOp.from_proto(proto)
    assert not SignatureChecker(CHAIN_KEYS.get).verify(tampered)


def test_tampered_proof_or_position_fails():
    ops = entries(3500, 7)
    checker = SignatureChecker(CHAIN_KEYS.get)
    proto = ops[3].to_proto()
    proto.batch_proof[0] = b"\x00" * 32
    assert not checker.verify(SignedOp.from_proto(proto))
    proto = ops[3].to_proto()
    proto.batch_index = 4
    assert not checker.verify(SignedOp.from_proto(proto))
    proto = ops[3].to_proto()
    del proto.batch_proof[-1]
    assert not checker.verify(SignedOp.from_proto(proto))


def test_operation_claiming_another_node_fails():
    # Node 0 signs an operation that says it was created by node 1.
    [op] = sign_operations([new_entry(4000, NODE_IDS[1], b"x")], NODE_KPS[0])
    assert op.node_id == NODE_IDS[1]
    assert not SignatureChecker(CHAIN_KEYS.get).verify(op)
    # An unknown node is refused too.
    [unknown] = sign_operations([new_entry(4001, OUTSIDER_ID, b"x")], OUTSIDER_KP)
    assert not SignatureChecker(CHAIN_KEYS.get).verify(unknown)


def test_signed_op_round_trip():
    ops = entries(5000, 3)
    for op in ops:
        decoded = SignedOp.decode(op.encode())
        assert decoded == op
        assert decoded.operation_bytes == op.operation_bytes
        assert decoded.hash == op.hash
        assert decoded.signature == op.signature
        assert decoded.batch_proof == op.batch_proof
        assert (decoded.batch_index, decoded.batch_size) == (op.batch_index, op.batch_size)
        assert decoded.merkle_root() == op.merkle_root()
        assert decoded.kind is OperationKind.ENTRY and decoded.entry_data == op.entry_data
        assert decoded.header() == op.header()


@pytest.mark.parametrize("size", [1, 150, 5000])
def test_a_batch_of_one_is_encoded_and_signed_as_the_general_path_does(size):
    # The single-operation path writes the SignedOperation itself; the general path (a batch of
    # two, whose first operation is the same) shows what the Merkle root and signature must be.
    operation = new_entry(7000, NODE_IDS[0], b"x" * size)
    [op] = sign_operations([operation], NODE_KPS[0])
    assert op.encoded is not None
    assert op.encoded == op.to_proto().SerializeToString()
    assert SignedOp.decode(op.encoded) == op
    assert (op.batch_proof, op.batch_index, op.batch_size) == ((), 0, 1)
    assert op.merkle_root() == canonical.merkle_root_and_proofs([op.hash])[0]
    assert op.signature == NODE_KPS[0].sign(canonical.operation_batch_payload(op.merkle_root()))
    assert SignatureChecker(CHAIN_KEYS.get).verify(op)
    assert not SignatureChecker({NODE_IDS[0]: NODE_KPS[1].public_key}.get).verify(op)


def test_sign_payload_is_the_keypair_signature():
    for keypair in NODE_KPS[:2]:
        for payload in (b"", b"abc", bytes(range(256)) * 3):
            assert sign_payload(keypair, payload) == keypair.sign(payload)
            assert keypair.public_key.verify(payload, sign_payload(keypair, payload))


def test_all_operation_kinds_round_trip():
    genesis = build_genesis(CELL_ID, CELL_KP)
    ops = sign_operations(
        [
            new_block_proposal(10, NODE_IDS[0], genesis.head.header_bytes),
            new_block_sign(11, NODE_IDS[0], 10, b"\x01" * 64),
            new_block_refuse(12, NODE_IDS[0], 10),
        ],
        NODE_KPS[0],
    )
    kinds = [SignedOp.decode(op.encode()).kind for op in ops]
    assert kinds == [OperationKind.BLOCK_PROPOSE, OperationKind.BLOCK_SIGN, OperationKind.BLOCK_REFUSE]
    assert [op.group_id for op in ops] == [10, 10, 10]


def test_from_proto_rejects_garbage_bytes():
    with pytest.raises(InvalidOperation):
        SignedOp.decode(b"\xff\xff\xff\xff garbage")
    bad = chain_pb2.SignedOperation(operation_bytes=b"\xff\xff\xff", signature=b"s", batch_size=1)
    with pytest.raises(InvalidOperation, match="do not parse"):
        SignedOp.from_proto(bad)


def test_from_proto_rejects_operation_without_kind():
    op = chain_pb2.Operation(group_id=7, operation_id=7, node_id=NODE_IDS[0])
    signed = chain_pb2.SignedOperation(operation_bytes=op.SerializeToString(), batch_size=1)
    with pytest.raises(InvalidOperation, match="no kind"):
        SignedOp.from_proto(signed)


def test_from_proto_rejects_entry_not_in_its_own_group():
    op = new_entry(7, NODE_IDS[0], b"data")
    op.group_id = 8
    signed = chain_pb2.SignedOperation(operation_bytes=op.SerializeToString(), batch_size=1)
    with pytest.raises(InvalidOperation, match="own group"):
        SignedOp.from_proto(signed)


def test_from_proto_rejects_bad_batch_position_and_missing_ids():
    op = new_entry(7, NODE_IDS[0], b"data")
    with pytest.raises(InvalidOperation, match="batch position"):
        SignedOp.from_proto(chain_pb2.SignedOperation(operation_bytes=op.SerializeToString(), batch_size=0))
    with pytest.raises(InvalidOperation, match="batch position"):
        SignedOp.from_proto(
            chain_pb2.SignedOperation(operation_bytes=op.SerializeToString(), batch_index=2, batch_size=2)
        )
    no_node = new_entry(7, "", b"data")
    with pytest.raises(InvalidOperation, match="no id or no node"):
        SignedOp.from_proto(chain_pb2.SignedOperation(operation_bytes=no_node.SerializeToString(), batch_size=1))


# -- block headers ----------------------------------------------------------------------------


def test_build_block_header_requires_sorted_unique_operations(genesis):
    ops = entries(6000, 4)
    head = build_block_header(CELL_ID, genesis.head, 6100, NODE_IDS[0], ops)
    assert head.operation_ids == [6000, 6001, 6002, 6003]
    assert head.offset == genesis.next_offset and head.height == 2
    assert head.header.previous_hash == genesis.hash and head.header.previous_offset == 0
    assert head.header.operations_size == sum(op.size for op in ops)
    assert head.header.operations_hash == canonical.operations_hash([op.hash for op in ops])
    with pytest.raises(InvalidBlock, match="sorted"):
        build_block_header(CELL_ID, genesis.head, 6100, NODE_IDS[0], list(reversed(ops)))
    with pytest.raises(InvalidBlock, match="sorted"):
        build_block_header(CELL_ID, genesis.head, 6100, NODE_IDS[0], [ops[0], ops[0], ops[1]])
    empty = build_block_header(CELL_ID, genesis.head, 6100, NODE_IDS[0], [])
    assert empty.operation_ids == [] and empty.header.operations_size == 0


def test_block_round_trip(genesis):
    block = block_after(genesis.head, entries(6500, 5), [0, 1], 6600)
    decoded = BlockView.decode(block.encode())
    assert decoded == block
    assert decoded.hash == block.hash and decoded.next_offset == block.next_offset
    with pytest.raises(InvalidBlock):
        BlockView.decode(b"\xff\xff garbage")


# -- block validation -------------------------------------------------------------------------


def test_validate_block_accepts_a_quorum_signed_block(genesis):
    block = block_after(genesis.head, entries(7000, 5), [0, 1], 7100)
    validate_block(block, genesis.head, CHAIN_KEYS, quorum_of_3)
    all_three = block_after(genesis.head, entries(7000, 5), [0, 1, 2], 7100)
    validate_block(all_three, genesis.head, CHAIN_KEYS, quorum_of_3)
    # And the next one on top of it.
    nxt = block_after(block.head, entries(7200, 1, node=2), [1, 2], 7300)
    validate_block(nxt, block.head, CHAIN_KEYS, quorum_of_3)
    # An empty block is valid too.
    empty = block_after(nxt.head, [], [0, 2], 7400)
    validate_block(empty, nxt.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_wrong_previous_hash(genesis):
    good = block_after(genesis.head, entries(7500, 2), [0, 1], 7600)
    head = resigned(good.head, previous_hash=b"\x16\x20" + b"\x00" * 32)
    with pytest.raises(InvalidBlock, match="hash of the previous block"):
        validate_block(quorum_signed(head, good.operations), genesis.head, CHAIN_KEYS, quorum_of_3)
    # Built on another predecessor at the same offset and height (a fork): its hash differs.
    fork_previous = resigned(genesis.head, operations_hash=b"\x16\x20" + b"\x01" * 32)
    assert fork_previous.next_offset == genesis.next_offset and fork_previous.hash != genesis.hash
    on_fork = block_after(fork_previous, entries(7500, 2), [0, 1], 7600)
    validate_block(on_fork, fork_previous, CHAIN_KEYS, quorum_of_3)
    with pytest.raises(InvalidBlock, match="hash of the previous block"):
        validate_block(on_fork, genesis.head, CHAIN_KEYS, quorum_of_3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("offset", "next+1"), ("offset", 0), ("height", 3), ("height", 1), ("previous_offset", 5)],
    ids=["offset+1", "offset-0", "height+1", "height-1", "previous_offset"],
)
def test_validate_block_rejects_wrong_position(genesis, field, value):
    good = block_after(genesis.head, entries(7700, 2), [0, 1], 7800)
    if value == "next+1":
        value = genesis.next_offset + 1
    head = resigned(good.head, **{field: value})
    with pytest.raises(InvalidBlock, match="does not follow|previous block"):
        validate_block(quorum_signed(head, good.operations), genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_another_cell(genesis):
    good = block_after(genesis.head, entries(7850, 2), [0, 1], 7860)
    head = resigned(good.head, cell_id=OUTSIDER_ID)
    with pytest.raises(InvalidBlock, match="belongs to cell"):
        validate_block(quorum_signed(head, good.operations), genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_reordered_operations(genesis):
    good = block_after(genesis.head, entries(7900, 3), [0, 1], 8000)
    # Operations reordered in the block body: they no longer match the header.
    reordered = BlockView(good.head, tuple(reversed(good.operations)), good.signatures)
    with pytest.raises(InvalidBlock, match="do not match the header"):
        validate_block(reordered, genesis.head, CHAIN_KEYS, quorum_of_3)
    # A header (signed by a quorum) that lists them out of order too.
    ops = list(reversed(good.operations))
    head = resigned(
        good.head,
        operations_header=[
            chain_pb2.BlockOperationHeader(operation_id=op.operation_id, operation_hash=op.hash) for op in ops
        ],
        operations_hash=canonical.operations_hash([op.hash for op in ops]),
    )
    with pytest.raises(InvalidBlock, match="not sorted"):
        validate_block(quorum_signed(head, ops), genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_a_swapped_operation(genesis):
    good = block_after(genesis.head, entries(8100, 3), [0, 1], 8200)
    # Same id and size, different content (and so hash).
    [swapped] = sign_operations([new_entry(8101, NODE_IDS[0], b"\xee" * 20)], NODE_KPS[0])
    assert swapped.operation_id == good.operations[1].operation_id and swapped.size == good.operations[1].size
    ops = (good.operations[0], swapped, good.operations[2])
    with pytest.raises(InvalidBlock, match="do not match the header"):
        validate_block(BlockView(good.head, ops, good.signatures), genesis.head, CHAIN_KEYS, quorum_of_3)
    # A missing operation is caught as well.
    missing = BlockView(good.head, good.operations[:2], good.signatures)
    with pytest.raises(InvalidBlock):
        validate_block(missing, genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_a_wrong_operations_hash_or_size(genesis):
    good = block_after(genesis.head, entries(8250, 3), [0, 1], 8260)
    bad_hash = resigned(good.head, operations_hash=canonical.operations_hash([]))
    with pytest.raises(InvalidBlock, match="operations hash"):
        validate_block(quorum_signed(bad_hash, good.operations), genesis.head, CHAIN_KEYS, quorum_of_3)
    bad_size = resigned(good.head, operations_size=good.header.operations_size + 1)
    with pytest.raises(InvalidBlock, match="operations size"):
        validate_block(quorum_signed(bad_size, good.operations), genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_too_few_signatures(genesis):
    one = block_after(genesis.head, entries(8300, 2), [0], 8400)
    with pytest.raises(InvalidBlock, match="1 valid chain node signature"):
        validate_block(one, genesis.head, CHAIN_KEYS, quorum_of_3)
    none = block_after(genesis.head, entries(8300, 2), [], 8400)
    with pytest.raises(InvalidBlock, match="0 valid"):
        validate_block(none, genesis.head, CHAIN_KEYS, quorum_of_3)
    # The same node signing twice counts once.
    twice = BlockView(one.head, one.operations, one.signatures * 2)
    with pytest.raises(InvalidBlock, match="not a quorum"):
        validate_block(twice, genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_ignores_signatures_of_non_chain_nodes(genesis):
    one = block_after(genesis.head, entries(8500, 2), [0], 8600)
    outsider = sign_block(one.head, OUTSIDER_ID, OUTSIDER_KP)
    assert OUTSIDER_KP.public_key.verify(canonical.block_payload(one.head.header_bytes), outsider.signature)
    block = one.with_signatures([*one.signatures, outsider])
    with pytest.raises(InvalidBlock, match="1 valid"):
        validate_block(block, genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_forged_signatures(genesis):
    one = block_after(genesis.head, entries(8700, 2), [0], 8800)
    # Node 2's id with a signature made by another key, and node 1's id with random bytes.
    by_wrong_key = chain_pb2.BlockSignature(
        node_id=NODE_IDS[2], signature=OUTSIDER_KP.sign(canonical.block_payload(one.head.header_bytes))
    )
    random_bytes = chain_pb2.BlockSignature(node_id=NODE_IDS[1], signature=b"\x42" * 64)
    # A valid signature of another block (or for another purpose) does not count either.
    other = block_after(genesis.head, entries(8900, 1), [1], 8950)
    replayed = chain_pb2.BlockSignature(node_id=NODE_IDS[1], signature=other.signatures[0].signature)
    genesis_domain = chain_pb2.BlockSignature(
        node_id=NODE_IDS[2], signature=NODE_KPS[2].sign(canonical.genesis_payload(one.head.header_bytes))
    )
    for forged in (by_wrong_key, random_bytes, replayed, genesis_domain):
        block = one.with_signatures([*one.signatures, forged])
        with pytest.raises(InvalidBlock, match="1 valid"):
            validate_block(block, genesis.head, CHAIN_KEYS, quorum_of_3)


def test_validate_block_rejects_non_entry_operations(genesis):
    ops = sign_operations(
        [
            new_entry(9000, NODE_IDS[0], b"a"),
            new_block_proposal(9001, NODE_IDS[0], genesis.head.header_bytes),
            new_block_sign(9002, NODE_IDS[0], 9001, b"\x00" * 64),
        ],
        NODE_KPS[0],
    )
    for op in ops[1:]:
        block = block_after(genesis.head, [ops[0], op], [0, 1], 9100)
        with pytest.raises(InvalidBlock, match="entry operations only"):
            validate_block(block, genesis.head, CHAIN_KEYS, quorum_of_3)


def test_next_offset_does_not_depend_on_signatures(genesis):
    ops = entries(9200, 4)
    # Two nodes build the same block, then hold different signature sets for it.
    on_a = block_after(genesis.head, ops, [0, 1], 9300)
    on_b = block_after(genesis.head, ops, [0, 1, 2], 9300)
    assert on_a.head.header_bytes == on_b.head.header_bytes and on_a.hash == on_b.hash
    assert len(on_a.encode()) != len(on_b.encode())
    expected = on_a.offset + len(on_a.head.header_bytes) + on_a.header.operations_size
    assert on_a.next_offset == on_b.next_offset == expected
    # So the next block is identical on both nodes.
    next_a = build_block_header(CELL_ID, on_a.head, 9400, NODE_IDS[1], entries(9350, 2, node=1))
    next_b = build_block_header(CELL_ID, on_b.head, 9400, NODE_IDS[1], entries(9350, 2, node=1))
    assert next_a.header_bytes == next_b.header_bytes
    assert next_a.offset == expected
    # Also after an encode/decode round trip with yet other signatures.
    stripped = BlockView.decode(on_a.with_signatures([]).encode())
    assert stripped.next_offset == expected
