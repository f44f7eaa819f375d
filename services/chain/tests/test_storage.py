"""Storage contract tests, run against the in-memory and the LevelDB stores, plus LevelDB durability.

"Reopen" is a crash and restart: the LevelDB storage is closed and opened again; the in-memory
stores are kept as they are (the simulator keeps them across simulated crashes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from exochain.model import (
    BlockHeaderView,
    BlockView,
    SignedOp,
    build_block_header,
    build_genesis,
    new_block_proposal,
    new_block_refuse,
    new_block_sign,
    new_entry,
    sign_block,
    sign_operations,
)
from exochain.storage import leveldb as leveldb_module
from exochain.storage.base import (
    ChainStore,
    CommitStatus,
    InvalidNextBlock,
    MetaStore,
    PendingEntry,
    PendingStore,
)
from exochain.storage.leveldb import LevelDbStorage, StorageInUse
from exochain.storage.memory import MemoryChainStore, MemoryMetaStore, MemoryPendingStore
from exocommon.errors import FailedPrecondition
from exocommon.ids import PeerId
from exocommon.keys import Keypair

KP = Keypair.from_seed(b"\x05" * 32)
NODE = str(PeerId.from_public_key(KP.public_key))
OTHER_KP = Keypair.from_seed(b"\x06" * 32)
OTHER_NODE = str(PeerId.from_public_key(OTHER_KP.public_key))
CELL_KP = Keypair.from_seed(b"\x0c" * 32)
CELL = str(PeerId.from_public_key(CELL_KP.public_key))


# -- backends ---------------------------------------------------------------------------------


class Backend:
    """One kind of storage, with a way to simulate a crash and restart."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.storage: LevelDbStorage | None = None
        self.chain: ChainStore
        self.pending: PendingStore
        self.meta: MetaStore
        if kind == "memory":
            self.chain, self.pending, self.meta = MemoryChainStore(), MemoryPendingStore(), MemoryMetaStore()
        else:
            self._open()

    def _open(self) -> None:
        self.storage = LevelDbStorage(self.path)
        self.chain, self.pending, self.meta = self.storage.chain, self.storage.pending, self.storage.meta

    def reopen(self) -> None:
        if self.storage is not None:
            self.storage.close()
            self._open()

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()


@pytest.fixture(params=["memory", "leveldb"])
def backend(request, tmp_path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path / "chain")
    yield b
    b.close()


# -- data -------------------------------------------------------------------------------------


def entry_ops(first_id: int, count: int, kp: Keypair = KP, node: str = NODE, tag: bytes = b"e") -> list[SignedOp]:
    return sign_operations([new_entry(first_id + i, node, tag * 16) for i in range(count)], kp)


def next_block(previous: BlockHeaderView, first_op_id: int, op_count: int, tag: bytes = b"e") -> BlockView:
    ops = entry_ops(first_op_id, op_count, tag=tag)
    proposal_id = first_op_id + op_count
    head = build_block_header(CELL, previous, proposal_id, NODE, ops)
    return BlockView(head, tuple(ops), (sign_block(head, NODE, KP),))


def make_chain(block_count: int, ops_per_block: int, first_op_id: int = 1000) -> list[BlockView]:
    """Genesis then `block_count - 1` blocks; block i holds ops [first + i*100, ...) and proposal first + i*100 + n."""
    blocks = [build_genesis(CELL, CELL_KP)]
    for i in range(1, block_count):
        blocks.append(next_block(blocks[-1].head, first_op_id + i * 100, ops_per_block))
    return blocks


CHAIN = make_chain(8, 3)


def write_all(chain: ChainStore, blocks: list[BlockView]) -> None:
    for block in blocks:
        assert chain.write_block(block) == block.next_offset


def ids(entries: Iterable[PendingEntry]) -> list[int]:
    return [e.op.operation_id for e in entries]


# -- chain ------------------------------------------------------------------------------------


def test_empty_chain(backend):
    chain = backend.chain
    assert chain.last_block() is None
    assert chain.next_offset() == 0
    assert chain.block_count() == 0
    assert chain.get_block(0) is None and chain.get_header(0) is None
    assert list(chain.blocks_from(0)) == [] and list(chain.headers_from(0)) == []
    assert chain.block_offset_of_operation(1000) is None
    assert chain.truncate_from(0) == []


def test_write_and_read_blocks(backend):
    write_all(backend.chain, CHAIN)
    for _ in range(2):
        chain = backend.chain
        assert chain.block_count() == len(CHAIN)
        assert chain.last_block() == CHAIN[-1]
        assert chain.next_offset() == CHAIN[-1].next_offset
        for block in CHAIN:
            assert chain.get_block(block.offset) == block
            assert chain.get_header(block.offset) == block.head
        # Offsets inside a block or past the end hold no block.
        assert chain.get_block(CHAIN[2].offset + 1) is None
        assert chain.get_header(CHAIN[2].offset + 1) is None
        assert chain.get_block(chain.next_offset()) is None
        assert list(chain.blocks_from(0)) == CHAIN
        assert list(chain.blocks_from(CHAIN[3].offset)) == CHAIN[3:]
        assert list(chain.blocks_from(CHAIN[3].offset + 1)) == CHAIN[4:]
        assert list(chain.blocks_from(chain.next_offset())) == []
        assert list(chain.headers_from(0)) == [b.head for b in CHAIN]
        assert list(chain.headers_from(CHAIN[5].offset)) == [b.head for b in CHAIN[5:]]
        # Offsets chain up: each block starts where the previous one ends.
        assert [b.offset for b in CHAIN[1:]] == [b.next_offset for b in CHAIN[:-1]]
        backend.reopen()


def test_blocks_keep_their_signatures(backend):
    block = CHAIN[1]
    extra = sign_block(block.head, OTHER_NODE, OTHER_KP)
    signed = block.with_signatures([*block.signatures, extra])
    write_all(backend.chain, [CHAIN[0], signed])
    backend.reopen()
    stored = backend.chain.get_block(block.offset)
    assert stored is not None and len(stored.signatures) == 2
    assert list(stored.signatures) == list(signed.signatures)


def test_write_at_wrong_offset_writes_nothing(backend):
    chain = backend.chain
    with pytest.raises(InvalidNextBlock) as info:
        chain.write_block(CHAIN[1])  # no genesis yet
    assert (info.value.offset, info.value.expected_offset) == (CHAIN[1].offset, 0)
    assert isinstance(info.value, FailedPrecondition)
    write_all(chain, CHAIN[:3])
    for wrong in (CHAIN[4], CHAIN[2], CHAIN[0]):  # a gap, a duplicate, a second genesis
        with pytest.raises(InvalidNextBlock) as info:
            chain.write_block(wrong)
        assert info.value.expected_offset == CHAIN[2].next_offset
    for _ in range(2):
        chain = backend.chain
        assert chain.block_count() == 3
        assert chain.last_block() == CHAIN[2]
        assert chain.get_block(CHAIN[4].offset) is None
        assert all(chain.block_offset_of_operation(op.operation_id) is None for op in CHAIN[4].operations)
        assert chain.block_offset_of_operation(CHAIN[4].header.proposed_operation_id) is None
        backend.reopen()
    assert backend.chain.write_block(CHAIN[3]) == CHAIN[3].next_offset


def assert_indexed(chain: ChainStore, blocks: list[BlockView]) -> None:
    for block in blocks:
        for op in block.operations:
            assert chain.block_offset_of_operation(op.operation_id) == block.offset
        if block.header.proposed_operation_id:
            assert chain.block_offset_of_operation(block.header.proposed_operation_id) == block.offset


def assert_not_indexed(chain: ChainStore, blocks: list[BlockView]) -> None:
    for block in blocks:
        for op in block.operations:
            assert chain.block_offset_of_operation(op.operation_id) is None
        assert chain.block_offset_of_operation(block.header.proposed_operation_id) is None


def test_operation_index(backend):
    write_all(backend.chain, CHAIN)
    assert_indexed(backend.chain, CHAIN)
    assert backend.chain.block_offset_of_operation(0) is None  # genesis has no proposal
    assert backend.chain.block_offset_of_operation(999_999) is None
    backend.reopen()
    assert_indexed(backend.chain, CHAIN)


def test_truncate_in_the_middle(backend):
    write_all(backend.chain, CHAIN)
    removed = backend.chain.truncate_from(CHAIN[4].offset)
    assert removed == CHAIN[4:]
    for _ in range(2):
        chain = backend.chain
        assert chain.block_count() == 4
        assert chain.last_block() == CHAIN[3]
        assert chain.next_offset() == CHAIN[3].next_offset == CHAIN[4].offset
        assert list(chain.blocks_from(0)) == CHAIN[:4]
        assert list(chain.headers_from(0)) == [b.head for b in CHAIN[:4]]
        assert chain.get_block(CHAIN[5].offset) is None and chain.get_header(CHAIN[5].offset) is None
        assert_indexed(chain, CHAIN[:4])
        assert_not_indexed(chain, CHAIN[4:])
        backend.reopen()
    # A different block (a fork) can now be written at the freed offset, then the chain continues.
    fork = next_block(CHAIN[3].head, 50_000, 2, tag=b"f")
    assert fork.offset == CHAIN[4].offset and fork.hash != CHAIN[4].hash
    backend.chain.write_block(fork)
    after = next_block(fork.head, 50_100, 1, tag=b"f")
    backend.chain.write_block(after)
    backend.reopen()
    assert list(backend.chain.blocks_from(0)) == [*CHAIN[:4], fork, after]
    assert_indexed(backend.chain, [*CHAIN[:4], fork, after])
    assert_not_indexed(backend.chain, CHAIN[4:])


def test_truncate_all(backend):
    write_all(backend.chain, CHAIN)
    assert backend.chain.truncate_from(0) == CHAIN
    for _ in range(2):
        chain = backend.chain
        assert chain.block_count() == 0 and chain.last_block() is None and chain.next_offset() == 0
        assert list(chain.blocks_from(0)) == [] and list(chain.headers_from(0)) == []
        assert_not_indexed(chain, CHAIN[1:])
        backend.reopen()
    write_all(backend.chain, CHAIN[:2])
    assert backend.chain.block_count() == 2


def test_truncate_edges(backend):
    write_all(backend.chain, CHAIN)
    # Past the end: nothing. Inside a block: from the next block on.
    assert backend.chain.truncate_from(CHAIN[-1].next_offset) == []
    assert backend.chain.truncate_from(CHAIN[5].offset + 1) == CHAIN[6:]
    assert backend.chain.truncate_from(CHAIN[5].offset) == [CHAIN[5]]
    assert backend.chain.last_block() == CHAIN[4]
    backend.reopen()
    assert backend.chain.block_count() == 5 and backend.chain.last_block() == CHAIN[4]


def test_iterating_while_truncating(backend):
    write_all(backend.chain, CHAIN)
    it = backend.chain.blocks_from(0)
    assert next(it) == CHAIN[0]
    backend.chain.truncate_from(CHAIN[2].offset)
    # The iterator keeps its snapshot; nothing raises.
    assert list(it) == CHAIN[1:]
    assert list(backend.chain.blocks_from(0)) == CHAIN[:2]


def test_thousand_blocks(backend):
    blocks = make_chain(1000, 2, first_op_id=10_000)
    write_all(backend.chain, blocks)
    assert backend.chain.block_count() == 1000
    assert list(backend.chain.blocks_from(0)) == blocks
    assert [h.offset for h in backend.chain.headers_from(0)] == [b.offset for b in blocks]
    backend.reopen()
    chain = backend.chain
    assert chain.block_count() == 1000 and chain.last_block() == blocks[-1]
    assert chain.next_offset() == blocks[-1].next_offset
    count = 0
    for expected, got in zip(blocks, chain.blocks_from(0), strict=True):
        assert got == expected
        count += 1
    assert count == 1000
    assert [h.height for h in chain.headers_from(blocks[500].offset)] == list(range(501, 1001))
    assert chain.block_offset_of_operation(blocks[777].operations[1].operation_id) == blocks[777].offset


# -- pending ----------------------------------------------------------------------------------


def group_ops(proposal_id: int, signer_ids: Sequence[int], refuse_ids: Sequence[int] = ()) -> list[SignedOp]:
    genesis = CHAIN[0]
    operations = [new_block_proposal(proposal_id, NODE, genesis.head.header_bytes)]
    operations += [new_block_sign(i, NODE, proposal_id, b"\x00" * 64) for i in signer_ids]
    operations += [new_block_refuse(i, NODE, proposal_id) for i in refuse_ids]
    return sign_operations(operations, KP)


def test_pending_put_get_count(backend):
    pending = backend.pending
    ops = entry_ops(10, 5)
    assert pending.put(ops) == [False] * 5
    assert pending.count() == 5
    assert pending.put(ops[3:] + entry_ops(20, 1)) == [True, True, False]
    assert pending.count() == 6
    assert pending.put([]) == []
    # Within one call, a repeated id is "already there" the second time.
    dup = entry_ops(30, 1)
    assert pending.put(dup + dup) == [False, True]
    for _ in range(2):
        pending = backend.pending
        assert pending.count() == 7
        for op in ops:
            entry = pending.get(op.operation_id)
            assert entry is not None and entry.op == op and entry.committed is None
            assert entry.op.operation_bytes == op.operation_bytes and entry.op.signature == op.signature
        assert pending.get(15) is None
        backend.reopen()


def test_pending_range_bounds(backend):
    backend.pending.put(entry_ops(10, 1) + entry_ops(20, 1) + entry_ops(30, 1) + entry_ops(40, 1) + entry_ops(50, 1))
    for _ in range(2):
        pending = backend.pending
        assert ids(pending.range()) == [10, 20, 30, 40, 50]
        assert ids(pending.range(after=20)) == [30, 40, 50]
        assert ids(pending.range(up_to=30)) == [10, 20, 30]
        assert ids(pending.range(after=20, up_to=40)) == [30, 40]
        assert ids(pending.range(after=19, up_to=41)) == [20, 30, 40]
        assert ids(pending.range(after=15, up_to=15)) == []
        assert ids(pending.range(after=30, up_to=30)) == []
        assert ids(pending.range(after=40, up_to=20)) == []
        assert ids(pending.range(after=50)) == []
        assert ids(pending.range(after=0, up_to=10)) == [10]
        assert ids(pending.range(up_to=9)) == []
        backend.reopen()


def test_pending_out_of_order_puts_are_ordered(backend):
    for first in (50, 10, 70, 30, 60, 20, 40):
        backend.pending.put(entry_ops(first, 2))
    expected = sorted(first + i for first in (50, 10, 70, 30, 60, 20, 40) for i in range(2))
    assert ids(backend.pending.range()) == expected
    backend.reopen()
    assert ids(backend.pending.range()) == expected


def test_pending_groups_and_delete(backend):
    pending = backend.pending
    pending.put(group_ops(100, [101, 102], [103]))
    pending.put(entry_ops(104, 1))
    # Signatures whose proposal is not (yet) here.
    pending.put(group_ops(200, [201])[1:])
    for _ in range(2):
        pending = backend.pending
        assert ids(pending.group(100)) == [100, 101, 102, 103]
        assert ids(pending.group(104)) == [104]
        assert ids(pending.group(200)) == [201]
        assert pending.group(101) == []  # not a group id
        assert pending.group(999) == []
        assert pending.count() == 6
        backend.reopen()
    # A member that is not a group id: only itself.
    backend.pending.delete([101])
    assert ids(backend.pending.group(100)) == [100, 102, 103]
    assert backend.pending.get(101) is None
    # A group id with members: the whole group.
    backend.pending.delete([100])
    assert backend.pending.group(100) == []
    assert all(backend.pending.get(i) is None for i in (100, 102, 103))
    backend.pending.delete([200, 104, 12345])  # group without its proposal, an entry, an unknown id
    for _ in range(2):
        assert backend.pending.count() == 0
        assert list(backend.pending.range()) == []
        assert backend.pending.group(200) == [] and backend.pending.group(104) == []
        backend.reopen()


def test_pending_delete_many(backend):
    backend.pending.put(entry_ops(1, 200))
    backend.pending.delete(range(1, 200, 2))  # 100 ids: bulk path
    backend.pending.delete([2, 4, 6])  # few ids: in-place path
    expected = list(range(8, 201, 2))
    assert ids(backend.pending.range()) == expected
    backend.reopen()
    assert ids(backend.pending.range()) == expected
    assert backend.pending.count() == len(expected)


def test_pending_set_committed(backend):
    ops = entry_ops(10, 4)
    backend.pending.put(ops)
    status = CommitStatus(block_offset=1234, block_height=7)
    backend.pending.set_committed([10, 11, 99], status)  # 99 is unknown: ignored
    for _ in range(2):
        pending = backend.pending
        assert pending.get(10).committed == status and pending.get(11).committed == status
        assert pending.get(12).committed is None
        assert pending.get(99) is None and pending.count() == 4
        assert [e.committed for e in pending.range()] == [status, status, None, None]
        backend.reopen()
    # Putting the identical operation again keeps its local status...
    assert backend.pending.put([ops[0]]) == [True]
    assert backend.pending.get(10).committed == status
    # ...a different operation under the same id starts uncommitted.
    [other] = entry_ops(11, 1, tag=b"z")
    assert other.hash != ops[1].hash
    assert backend.pending.put([other]) == [True]
    backend.reopen()
    assert backend.pending.get(10).committed == status
    assert backend.pending.get(11).committed is None and backend.pending.get(11).op == other
    # Back to uncommitted (after a truncation), and recommitted elsewhere.
    backend.pending.set_committed([10], None)
    backend.pending.set_committed([12], CommitStatus(99, 3))
    backend.reopen()
    assert [e.committed for e in backend.pending.range()] == [None, None, CommitStatus(99, 3), None]


def test_pending_replaced_with_another_group(backend):
    [sign] = group_ops(100, [101])[1:]
    backend.pending.put([sign])
    other = sign_operations([new_block_refuse(101, NODE, 300)], KP)
    backend.pending.put(other)
    backend.reopen()
    assert backend.pending.group(100) == []
    assert ids(backend.pending.group(300)) == [101]
    backend.pending.delete([300])
    assert backend.pending.count() == 0


def test_pending_range_while_deleting(backend):
    backend.pending.put(entry_ops(1, 10))
    it = backend.pending.range()
    assert next(it).op.operation_id == 1
    backend.pending.delete([2, 3, 4])
    backend.pending.put(entry_ops(100, 1))
    assert ids(it) == [5, 6, 7, 8, 9, 10]


# -- meta -------------------------------------------------------------------------------------


def test_meta(backend):
    meta = backend.meta
    assert meta.get_int("a") is None
    meta.set_int("a", 1)
    meta.set_int("a", 2)
    meta.set_int("big", 2**64 - 1)
    meta.set_int("negative", -5)
    meta.set_int("zero", 0)
    backend.reopen()
    meta = backend.meta
    assert meta.get_int("a") == 2
    assert meta.get_int("big") == 2**64 - 1
    assert meta.get_int("negative") == -5
    assert meta.get_int("zero") == 0
    assert meta.get_int("b") is None


def test_stores_are_independent(backend):
    # Same integers as block offsets, op ids and meta keys do not collide across the stores.
    write_all(backend.chain, CHAIN[:3])
    backend.pending.put(entry_ops(CHAIN[1].offset, 1))
    backend.meta.set_int("chain", 5)
    backend.reopen()
    assert backend.chain.block_count() == 3 and backend.pending.count() == 1
    assert backend.meta.get_int("chain") == 5


# -- LevelDB only -----------------------------------------------------------------------------


WRITER = textwrap.dedent(
    """
    import sys, time
    from exochain.model import BlockView, build_block_header, build_genesis, new_entry, sign_block, sign_operations
    from exochain.storage.base import CommitStatus
    from exochain.storage.leveldb import LevelDbStorage
    from exocommon.ids import PeerId
    from exocommon.keys import Keypair

    path, n_pending, n_blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kp = Keypair.from_seed(b"\\x07" * 32)
    node = str(PeerId.from_public_key(kp.public_key))
    storage = LevelDbStorage(path)
    storage.chain.write_block(build_genesis(node, kp))
    op_id = 1
    for _ in range(n_blocks):
        ops = sign_operations([new_entry(op_id + i, node, b"block") for i in range(3)], kp)
        head = build_block_header(node, storage.chain.last_block().head, op_id + 3, node, ops)
        storage.chain.write_block(BlockView(head, tuple(ops), (sign_block(head, node, kp),)))
        op_id += 4
    for start in range(0, n_pending, 50):
        batch = range(1_000_000 + start, 1_000_000 + min(n_pending, start + 50))
        storage.pending.put(sign_operations([new_entry(i, node, b"pending") for i in batch], kp))
    storage.pending.set_committed([1_000_000], CommitStatus(7, 8))
    storage.meta.set_int("written", n_pending)
    print("done", flush=True)
    time.sleep(120)
    """
)


def test_leveldb_survives_sigkill(tmp_path):
    path = tmp_path / "chain"
    n_pending, n_blocks = 500, 40
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(n_pending), str(n_blocks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "done", proc.stderr.read() if proc.poll() is not None else line
        # While the writer runs, nobody else may open the storage.
        with pytest.raises(StorageInUse, match=f"chain storage at {path} is in use by another process"):
            LevelDbStorage(path)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    kp = Keypair.from_seed(b"\x07" * 32)
    with LevelDbStorage(path) as storage:
        assert storage.chain.block_count() == n_blocks + 1
        blocks = list(storage.chain.blocks_from(0))
        assert len(blocks) == n_blocks + 1 and blocks[-1] == storage.chain.last_block()
        assert [b.height for b in blocks] == list(range(1, n_blocks + 2))
        for previous, block in zip(blocks, blocks[1:], strict=False):
            assert block.header.previous_hash == previous.hash and block.offset == previous.next_offset
            assert len(block.operations) == 3
        assert storage.chain.block_offset_of_operation(1) == blocks[1].offset
        assert storage.chain.block_offset_of_operation(4 * n_blocks) == blocks[-1].offset
        assert storage.pending.count() == n_pending
        assert ids(storage.pending.range()) == list(range(1_000_000, 1_000_000 + n_pending))
        assert storage.pending.get(1_000_000).committed == CommitStatus(7, 8)
        assert storage.meta.get_int("written") == n_pending
        assert all(e.op.node_id == str(PeerId.from_public_key(kp.public_key)) for e in storage.pending.range())


OPENER = textwrap.dedent(
    """
    import sys
    from exochain.storage.leveldb import LevelDbStorage
    from exocommon.errors import FailedPrecondition
    try:
        LevelDbStorage(sys.argv[1])
    except FailedPrecondition as exc:
        print(type(exc).__name__, exc.grpc_status, exc)
    else:
        print("opened")
    """
)


def test_leveldb_second_opener_in_another_process_is_refused(tmp_path):
    path = tmp_path / "chain"
    with LevelDbStorage(path) as storage:
        storage.meta.set_int("x", 1)
        out = subprocess.run(
            [sys.executable, "-c", OPENER, str(path)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert out.strip() == f"StorageInUse FAILED_PRECONDITION chain storage at {path} is in use by another process"
    # Once closed, another process may open it.
    out = subprocess.run(
        [sys.executable, "-c", OPENER, str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "opened"


def test_leveldb_second_opener_in_this_process_is_refused(tmp_path):
    with LevelDbStorage(tmp_path / "chain"):
        with pytest.raises(StorageInUse, match="already open in this process"):
            LevelDbStorage(tmp_path / "chain")


def test_leveldb_bad_path(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(FailedPrecondition):
        LevelDbStorage(file)


def test_leveldb_without_sync_writes(tmp_path):
    with LevelDbStorage(tmp_path / "chain", sync_writes=False) as storage:
        write_all(storage.chain, CHAIN)
        storage.pending.put(entry_ops(1, 10))
    with LevelDbStorage(tmp_path / "chain") as storage:
        assert list(storage.chain.blocks_from(0)) == CHAIN
        assert storage.pending.count() == 10


def test_leveldb_close_is_idempotent(tmp_path):
    storage = LevelDbStorage(tmp_path / "chain")
    assert not storage.closed
    storage.close()
    storage.close()
    assert storage.closed


def test_pending_replaced_by_the_same_operation_signed_in_another_batch(backend):
    [alone] = entry_ops(10, 1)
    in_batch = entry_ops(10, 2)[0]
    assert alone.hash == in_batch.hash and alone.signature != in_batch.signature
    backend.pending.put([alone])
    backend.pending.set_committed([10], CommitStatus(5, 2))
    assert backend.pending.put([in_batch]) == [True]
    backend.reopen()
    entry = backend.pending.get(10)
    assert entry.op.signature == in_batch.signature and entry.op.batch_size == 2
    assert entry.committed == CommitStatus(5, 2)  # same operation: local status kept


def test_group_commit_sync_covers_the_writes_made_before_it(tmp_path):
    blocks = make_chain(3, 4)
    with LevelDbStorage(tmp_path / "db", sync_writes=False) as storage:
        assert not storage.has_unsynced_writes()
        write_all(storage.chain, blocks)
        storage.pending.put(entry_ops(50_000, 10))
        assert storage.has_unsynced_writes()
        storage.sync()
        assert not storage.has_unsynced_writes()
        storage.sync()  # nothing new: returns at once
        storage.meta.set_int("k", 1)
        assert storage.has_unsynced_writes()
        storage.sync()
        assert not storage.has_unsynced_writes()
    with LevelDbStorage(tmp_path / "db") as reopened:
        assert [b.hash for b in reopened.chain.blocks_from(0)] == [b.hash for b in blocks]
        assert reopened.pending.count() == 10 and reopened.meta.get_int("k") == 1
        assert not reopened.has_unsynced_writes()  # sync_writes=True: durable when written


def test_group_commit_sync_follows_leveldb_to_each_new_log(tmp_path, monkeypatch):
    # A tiny memtable: LevelDB moves to a new log file every few writes.
    monkeypatch.setattr(leveldb_module, "WRITE_BUFFER_BYTES", 64 * 1024)
    with LevelDbStorage(tmp_path / "db", sync_writes=False) as storage:
        synced_logs = set()
        for round_ in range(40):
            storage.pending.put(entry_ops(1_000 + round_ * 100, 100, tag=b"x" * 8))
            storage.sync()
            assert not storage.has_unsynced_writes()
            # The log kept open is the newest in the folder: the one the writes just went to.
            kept = os.readlink(f"/proc/self/fd/{storage._log_fd}")
            logs = sorted(name for name in os.listdir(tmp_path / "db") if name.endswith(".log"))
            assert Path(kept).name == logs[-1]
            synced_logs.add(Path(kept).name)
        assert len(synced_logs) > 3  # it did switch logs, and the syncs followed
    with LevelDbStorage(tmp_path / "db") as reopened:
        assert reopened.pending.count() == 4_000


def test_encoded_blocks_are_the_stored_bytes(backend):
    blocks = make_chain(4, 3)
    write_all(backend.chain, blocks)
    encoded = list(backend.chain.encoded_blocks_from(blocks[1].offset))
    assert [offset for offset, _ in encoded] == [b.offset for b in blocks[1:]]
    assert [data for _, data in encoded] == [b.encode() for b in blocks[1:]]
