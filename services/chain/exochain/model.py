"""Operations and blocks: building, parsing, hashing, signing and validating them.

Every byte that is hashed or signed comes from `exocommon.canonical`; this module only decides
*which* bytes (always those stored and sent, never a re-serialisation).

* An operation is a serialised `Operation`; its hash is the SHA3-256 multihash of those bytes.
  Operations appended together form a batch signed once by their node (Merkle root).
* A block is `header_bytes` (a serialised `BlockHeader`; its multihash is the block hash), the
  operations in id order, and the signatures of the chain nodes that voted for it. Its size, and
  so the next block's offset, depends on the header only: `len(header_bytes) + operations_size`.
* The genesis block (offset 0, height 1) is signed with the cell key.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from exocommon import canonical
from exocommon.errors import InvalidArgument
from exocommon.hashing import multihash_sha3_256
from exocommon.keys import Keypair, PublicKey
from exocore.chain.v1 import chain_pb2


class InvalidOperation(InvalidArgument):
    """An operation that cannot be parsed or does not verify."""


class InvalidBlock(InvalidArgument):
    """A block that cannot be parsed or does not validate."""


class OperationKind(enum.Enum):
    ENTRY = "entry"
    BLOCK_PROPOSE = "block_propose"
    BLOCK_SIGN = "block_sign"
    BLOCK_REFUSE = "block_refuse"


@dataclass(frozen=True, slots=True, eq=False)
class SignedOp:
    """A parsed `SignedOperation`; equality and hashing by operation hash."""

    operation: chain_pb2.Operation
    operation_bytes: bytes
    hash: bytes
    signature: bytes
    batch_proof: tuple[bytes, ...]
    batch_index: int
    batch_size: int

    @property
    def operation_id(self) -> int:
        return self.operation.operation_id

    @property
    def group_id(self) -> int:
        return self.operation.group_id

    @property
    def node_id(self) -> str:
        return self.operation.node_id

    @property
    def kind(self) -> OperationKind:
        return OperationKind(self.operation.WhichOneof("kind"))

    @property
    def entry_data(self) -> bytes:
        return self.operation.entry.data

    @property
    def size(self) -> int:
        return len(self.operation_bytes)

    @property
    def encoded_size_max(self) -> int:
        """At least the bytes this operation adds to an encoded `Block`: its `SignedOperation` and its
        line in the block header (what block size limits count)."""
        return len(self.operation_bytes) + len(self.signature) + 34 * len(self.batch_proof) + 96

    def merkle_root(self) -> bytes | None:
        return canonical.merkle_root_from_proof(self.hash, self.batch_index, self.batch_size, list(self.batch_proof))

    def to_proto(self) -> chain_pb2.SignedOperation:
        return chain_pb2.SignedOperation(
            operation_bytes=self.operation_bytes,
            signature=self.signature,
            batch_proof=self.batch_proof,
            batch_index=self.batch_index,
            batch_size=self.batch_size,
        )

    def header(self) -> chain_pb2.OperationHeader:
        return chain_pb2.OperationHeader(
            group_id=self.group_id, operation_id=self.operation_id, operation_hash=self.hash
        )

    @classmethod
    def from_proto(cls, signed: chain_pb2.SignedOperation) -> SignedOp:
        """Parses and checks the structure (not the signature: see `SignatureChecker`)."""
        try:
            operation = chain_pb2.Operation.FromString(signed.operation_bytes)
        except DecodeError as exc:
            raise InvalidOperation(f"operation bytes do not parse: {exc}") from exc
        kind = operation.WhichOneof("kind")
        if kind is None:
            raise InvalidOperation(f"operation {operation.operation_id} has no kind")
        if operation.operation_id == 0 or not operation.node_id:
            raise InvalidOperation("operation has no id or no node id")
        if kind in ("entry", "block_propose") and operation.group_id != operation.operation_id:
            raise InvalidOperation(f"{kind} operation {operation.operation_id} must be its own group")
        if signed.batch_size == 0 or signed.batch_index >= signed.batch_size:
            raise InvalidOperation(f"operation {operation.operation_id} has a bad batch position")
        return cls(
            operation=operation,
            operation_bytes=bytes(signed.operation_bytes),
            hash=multihash_sha3_256(signed.operation_bytes),
            signature=bytes(signed.signature),
            batch_proof=tuple(bytes(p) for p in signed.batch_proof),
            batch_index=signed.batch_index,
            batch_size=signed.batch_size,
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedOp:
        try:
            return cls.from_proto(chain_pb2.SignedOperation.FromString(data))
        except DecodeError as exc:
            raise InvalidOperation(f"signed operation does not parse: {exc}") from exc

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SignedOp) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"SignedOp({self.kind.value} id={self.operation_id} group={self.group_id} node={self.node_id[-6:]})"


def sign_operations(operations: Sequence[chain_pb2.Operation], keypair: Keypair) -> list[SignedOp]:
    """Signs a batch of operations of this node with one signature over their Merkle root."""
    if not operations:
        return []
    encoded = [canonical.deterministic_bytes(op) for op in operations]
    hashes = [multihash_sha3_256(b) for b in encoded]
    root, proofs = canonical.merkle_root_and_proofs(hashes)
    signature = keypair.sign(canonical.operation_batch_payload(root))
    return [
        SignedOp(op, data, h, signature, tuple(proof), index, len(operations))
        for index, (op, data, h, proof) in enumerate(zip(operations, encoded, hashes, proofs, strict=True))
    ]


def new_entry(operation_id: int, node_id: str, data: bytes) -> chain_pb2.Operation:
    return chain_pb2.Operation(
        group_id=operation_id, operation_id=operation_id, node_id=node_id, entry=chain_pb2.OperationEntry(data=data)
    )


def new_block_proposal(operation_id: int, node_id: str, header_bytes: bytes) -> chain_pb2.Operation:
    return chain_pb2.Operation(
        group_id=operation_id,
        operation_id=operation_id,
        node_id=node_id,
        block_propose=chain_pb2.OperationBlockPropose(header_bytes=header_bytes),
    )


def new_block_sign(operation_id: int, node_id: str, proposal_id: int, signature: bytes) -> chain_pb2.Operation:
    return chain_pb2.Operation(
        group_id=proposal_id,
        operation_id=operation_id,
        node_id=node_id,
        block_sign=chain_pb2.OperationBlockSign(
            signature=chain_pb2.BlockSignature(node_id=node_id, signature=signature)
        ),
    )


def new_block_refuse(operation_id: int, node_id: str, proposal_id: int) -> chain_pb2.Operation:
    return chain_pb2.Operation(
        group_id=proposal_id,
        operation_id=operation_id,
        node_id=node_id,
        block_refuse=chain_pb2.OperationBlockRefuse(),
    )


class SignatureChecker:
    """Verifies operation signatures, one Ed25519 check per (node, batch root), cached."""

    def __init__(self, node_keys: Callable[[str], PublicKey | None], cache_size: int = 65_536) -> None:
        self._node_keys = node_keys
        self._verified: OrderedDict[tuple[str, bytes, bytes], None] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, op: SignedOp) -> bool:
        """True if `op` was signed by its node, a node this checker knows."""
        root = op.merkle_root()
        if root is None:
            return False
        key = (op.node_id, root, op.signature)
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        public_key = self._node_keys(op.node_id)
        if public_key is None or not public_key.verify(canonical.operation_batch_payload(root), op.signature):
            return False
        self._verified[key] = None
        if len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return True


@dataclass(frozen=True, slots=True)
class BlockHeaderView:
    """A parsed block header with its exact bytes and hash."""

    header: chain_pb2.BlockHeader
    header_bytes: bytes
    hash: bytes

    @classmethod
    def parse(cls, header_bytes: bytes) -> BlockHeaderView:
        try:
            header = chain_pb2.BlockHeader.FromString(header_bytes)
        except DecodeError as exc:
            raise InvalidBlock(f"block header does not parse: {exc}") from exc
        return cls(header, bytes(header_bytes), multihash_sha3_256(header_bytes))

    @property
    def offset(self) -> int:
        return self.header.offset

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def next_offset(self) -> int:
        return self.header.offset + len(self.header_bytes) + self.header.operations_size

    @property
    def proposed_operation_id(self) -> int:
        return self.header.proposed_operation_id

    @property
    def operation_ids(self) -> list[int]:
        return [h.operation_id for h in self.header.operations_header]

    def partial_header(self) -> chain_pb2.BlockPartialHeader:
        h = self.header
        return chain_pb2.BlockPartialHeader(
            offset=h.offset,
            height=h.height,
            previous_offset=h.previous_offset,
            previous_hash=h.previous_hash,
            proposed_operation_id=h.proposed_operation_id,
            proposed_node_id=h.proposed_node_id,
            block_size=len(self.header_bytes) + h.operations_size,
            block_hash=self.hash,
            operations_size=h.operations_size,
        )


@dataclass(frozen=True, slots=True)
class BlockView:
    """A full block: header, operations (id order) and the signatures collected for it."""

    head: BlockHeaderView
    operations: tuple[SignedOp, ...]
    signatures: tuple[chain_pb2.BlockSignature, ...] = field(default=())

    @property
    def offset(self) -> int:
        return self.head.offset

    @property
    def height(self) -> int:
        return self.head.height

    @property
    def next_offset(self) -> int:
        return self.head.next_offset

    @property
    def hash(self) -> bytes:
        return self.head.hash

    @property
    def header(self) -> chain_pb2.BlockHeader:
        return self.head.header

    def to_proto(self) -> chain_pb2.Block:
        return chain_pb2.Block(
            header_bytes=self.head.header_bytes,
            operations=[op.to_proto() for op in self.operations],
            signatures=list(self.signatures),
        )

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_proto(cls, block: chain_pb2.Block) -> BlockView:
        head = BlockHeaderView.parse(block.header_bytes)
        operations = tuple(SignedOp.from_proto(op) for op in block.operations)
        return cls(head, operations, tuple(block.signatures))

    @classmethod
    def decode(cls, data: bytes) -> BlockView:
        try:
            return cls.from_proto(chain_pb2.Block.FromString(data))
        except DecodeError as exc:
            raise InvalidBlock(f"block does not parse: {exc}") from exc

    def with_signatures(self, signatures: Iterable[chain_pb2.BlockSignature]) -> BlockView:
        return BlockView(self.head, self.operations, tuple(sorted(signatures, key=lambda s: s.node_id)))


def build_block_header(
    cell_id: str,
    previous: BlockHeaderView,
    proposal_operation_id: int,
    proposer_node_id: str,
    operations: Sequence[SignedOp],
) -> BlockHeaderView:
    """The header of the block after `previous` holding `operations` (sorted by id)."""
    ids = [op.operation_id for op in operations]
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise InvalidBlock("block operations must be sorted by id, without duplicates")
    header = chain_pb2.BlockHeader(
        offset=previous.next_offset,
        height=previous.height + 1,
        previous_offset=previous.offset,
        previous_hash=previous.hash,
        proposed_operation_id=proposal_operation_id,
        proposed_node_id=proposer_node_id,
        operations_size=sum(op.size for op in operations),
        operations_header=[
            chain_pb2.BlockOperationHeader(operation_id=op.operation_id, operation_hash=op.hash) for op in operations
        ],
        operations_hash=canonical.operations_hash([op.hash for op in operations]),
        cell_id=cell_id,
    )
    return BlockHeaderView.parse(canonical.deterministic_bytes(header))


def sign_block(head: BlockHeaderView, node_id: str, keypair: Keypair) -> chain_pb2.BlockSignature:
    return chain_pb2.BlockSignature(node_id=node_id, signature=keypair.sign(canonical.block_payload(head.header_bytes)))


def build_genesis(cell_id: str, cell_keypair: Keypair) -> BlockView:
    """Offset 0, height 1, no operations, signed with the cell key (signature node id = cell id)."""
    header = chain_pb2.BlockHeader(
        offset=0,
        height=1,
        operations_hash=canonical.operations_hash([]),
        cell_id=cell_id,
    )
    head = BlockHeaderView.parse(canonical.deterministic_bytes(header))
    signature = chain_pb2.BlockSignature(
        node_id=cell_id, signature=cell_keypair.sign(canonical.genesis_payload(head.header_bytes))
    )
    return BlockView(head, (), (signature,))


def validate_genesis(block: BlockView, cell_id: str, cell_public_key: PublicKey) -> None:
    h = block.header
    if h.offset != 0 or h.height != 1 or h.previous_hash or block.operations:
        raise InvalidBlock("genesis block must be at offset 0, height 1, with no previous block nor operations")
    if h.cell_id != cell_id:
        raise InvalidBlock(f"genesis block is for cell {h.cell_id}, not {cell_id}")
    payload = canonical.genesis_payload(block.head.header_bytes)
    if not any(s.node_id == cell_id and cell_public_key.verify(payload, s.signature) for s in block.signatures):
        raise InvalidBlock("genesis block is not signed by the cell key")


def validate_block(
    block: BlockView,
    previous: BlockHeaderView,
    chain_node_keys: Mapping[str, PublicKey],
    has_quorum: Callable[[int], bool],
) -> None:
    """Checks a (non-genesis) block against its predecessor: hash chain, operations and their hash,
    and valid signatures from a quorum of the chain nodes. Raises InvalidBlock saying what is wrong."""
    h = block.header
    where = f"block at offset {h.offset}"
    if h.offset != previous.next_offset or h.height != previous.height + 1:
        raise InvalidBlock(f"{where} (height {h.height}) does not follow block at offset {previous.offset}")
    if h.previous_offset != previous.offset or h.previous_hash != previous.hash:
        raise InvalidBlock(f"{where} does not point to the hash of the previous block")
    if h.cell_id != previous.header.cell_id:
        raise InvalidBlock(f"{where} belongs to cell {h.cell_id}")
    ids = [op.operation_id for op in block.operations]
    if ids != block.head.operation_ids or [op.hash for op in block.operations] != [
        oh.operation_hash for oh in h.operations_header
    ]:
        raise InvalidBlock(f"{where}: operations do not match the header")
    if ids != sorted(set(ids)):
        raise InvalidBlock(f"{where}: operations are not sorted by id")
    if sum(op.size for op in block.operations) != h.operations_size:
        raise InvalidBlock(f"{where}: operations size does not match the header")
    if canonical.operations_hash([op.hash for op in block.operations]) != h.operations_hash:
        raise InvalidBlock(f"{where}: operations hash does not match")
    if any(op.kind is not OperationKind.ENTRY for op in block.operations):
        raise InvalidBlock(f"{where}: blocks hold entry operations only")
    payload = canonical.block_payload(block.head.header_bytes)
    signers = {
        s.node_id
        for s in block.signatures
        if (key := chain_node_keys.get(s.node_id)) is not None and key.verify(payload, s.signature)
    }
    if not has_quorum(len(signers)):
        raise InvalidBlock(f"{where}: {len(signers)} valid chain node signature(s) is not a quorum")
