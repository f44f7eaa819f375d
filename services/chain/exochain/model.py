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
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import nacl.bindings
from google.protobuf.message import DecodeError

from exochain import wire
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
    # The serialised `SignedOperation`, once known (set by `encode`, or given by whoever parsed it).
    encoded: bytes | None = field(default=None, compare=False, repr=False)

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
    def from_proto(cls, signed: chain_pb2.SignedOperation, encoded: bytes | None = None) -> SignedOp:
        """Parses and checks the structure (not the signature: see `SignatureChecker`). `encoded`:
        the serialised `signed`, when the caller has it (kept for `encode`)."""
        data = signed.operation_bytes  # a bytes object, read once (each read copies)
        try:
            operation = _parse_operation(data)
        except DecodeError as exc:
            raise InvalidOperation(f"operation bytes do not parse: {exc}") from exc
        kind = operation.WhichOneof("kind")
        operation_id = operation.operation_id
        if kind is None:
            raise InvalidOperation(f"operation {operation_id} has no kind")
        if operation_id == 0 or not operation.node_id:
            raise InvalidOperation("operation has no id or no node id")
        if (kind == "entry" or kind == "block_propose") and operation.group_id != operation_id:
            raise InvalidOperation(f"{kind} operation {operation_id} must be its own group")
        batch_index, batch_size = signed.batch_index, signed.batch_size
        if batch_size == 0 or batch_index >= batch_size:
            raise InvalidOperation(f"operation {operation_id} has a bad batch position")
        return cls(
            operation,
            data,
            multihash_sha3_256(data),
            signed.signature,
            tuple(signed.batch_proof),
            batch_index,
            batch_size,
            encoded,
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedOp:
        try:
            return cls.from_proto(chain_pb2.SignedOperation.FromString(data), data)
        except DecodeError as exc:
            raise InvalidOperation(f"signed operation does not parse: {exc}") from exc

    def encode(self) -> bytes:
        """The serialised `SignedOperation` (computed once)."""
        encoded = self.encoded
        if encoded is None:
            encoded = self.to_proto().SerializeToString()
            object.__setattr__(self, "encoded", encoded)
        return encoded

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
    if len(operations) == 1:
        return [_sign_one(operations[0], keypair)]
    encoded = [canonical.deterministic_bytes(op) for op in operations]
    hashes = [multihash_sha3_256(b) for b in encoded]
    root, proofs = canonical.merkle_root_and_proofs(hashes)
    signature = sign_payload(keypair, canonical.operation_batch_payload(root))
    return [
        SignedOp(op, data, h, signature, tuple(proof), index, len(operations))
        for index, (op, data, h, proof) in enumerate(zip(operations, encoded, hashes, proofs, strict=True))
    ]


# The 64-byte libsodium secret key of each keypair that signed here, by seed (see `_sign`).
_SECRET_KEYS: dict[bytes, bytes] = {}
_SIGNED_OPERATION_BYTES_TAG = wire.tag(1, wire.WIRE_LENGTH_DELIMITED)
_SIGNED_SIGNATURE_TAG = wire.tag(2, wire.WIRE_LENGTH_DELIMITED)
_SIGNED_BATCH_SIZE_ONE = wire.varint_field(wire.tag(5, wire.WIRE_VARINT), 1)


def sign_payload(keypair: Keypair, payload: bytes) -> bytes:
    """`keypair.sign(payload)` (the same signature: Ed25519 is deterministic) through PyNaCl's
    binding directly, without its key and message objects: an append signs while the caller
    waits, and on an idle node (cold caches) those layers cost as much as the signature itself."""
    seed = keypair.seed
    secret = _SECRET_KEYS.get(seed)
    if secret is None:
        secret = _SECRET_KEYS[seed] = nacl.bindings.crypto_sign_seed_keypair(seed)[1]
    return nacl.bindings.crypto_sign(payload, secret)[:64]


def _sign_one(operation: chain_pb2.Operation, keypair: Keypair) -> SignedOp:
    """A batch of one (an append of one entry, a vote, a proposal): its Merkle root is its leaf and
    its proof empty; the serialised `SignedOperation` is written directly (`wire`)."""
    data = canonical.deterministic_bytes(operation)
    operation_hash = multihash_sha3_256(data)
    signature = sign_payload(keypair, canonical.operation_batch_payload(canonical.merkle_leaf(operation_hash)))
    encoded = (
        wire.length_delimited(_SIGNED_OPERATION_BYTES_TAG, data)
        + wire.length_delimited(_SIGNED_SIGNATURE_TAG, signature)
        + _SIGNED_BATCH_SIZE_ONE
    )
    return SignedOp(operation, data, operation_hash, signature, (), 0, 1, encoded)


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


_parse_operation = chain_pb2.Operation.FromString
_sha3_256 = hashlib.sha3_256


def _verified_batch_root(batch: Sequence[SignedOp]) -> bytes | None:
    """The Merkle root of a whole batch (operations in batch order), if every operation's proof is
    the path of that tree (the tree of `canonical.merkle_root_and_proofs`, built once: about two
    hashes per operation rather than one per level for each); None if a proof differs."""
    level = [_sha3_256(b"\x00" + op.hash).digest() for op in batch]
    levels = [level]
    while len(level) > 1:
        last = len(level) - 1
        parents = [_sha3_256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, last, 2)]
        if len(level) % 2:
            parents.append(level[last])  # an odd node is carried up unchanged
        level = parents
        levels.append(level)
    for index, op in enumerate(batch):
        proof = op.batch_proof
        step = 0
        position = index
        for nodes in levels[:-1]:
            sibling = position ^ 1
            if sibling < len(nodes):
                if step >= len(proof) or proof[step] != nodes[sibling]:
                    return None
                step += 1
            position >>= 1
        if step != len(proof):
            return None
    return level[0]


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
        return self._verify_root(op.node_id, root, op.signature)

    def verify_many(self, ops: Sequence[SignedOp]) -> list[bool]:
        """`verify` of each operation. The operations of a batch that are all here are checked
        together: one Merkle tree built from their hashes (about two hashes per operation instead of
        one per level for each), compared with the proof each carries, then one signature check."""
        results = [False] * len(ops)
        batches: dict[tuple[str, bytes, int], list[int]] = {}
        for position, op in enumerate(ops):
            batches.setdefault((op.operation.node_id, op.signature, op.batch_size), []).append(position)
        for (node_id, signature, size), positions in batches.items():
            if size > 2 and len(positions) == size:
                ordered = sorted(positions, key=lambda position: ops[position].batch_index)
                if all(ops[position].batch_index == index for index, position in enumerate(ordered)):
                    batch = [ops[position] for position in ordered]
                    root = _verified_batch_root(batch)
                    if root is not None and self._verify_root(node_id, root, signature):
                        for position in positions:
                            results[position] = True
                        continue
            for position in positions:
                results[position] = self.verify(ops[position])
        return results

    def _verify_root(self, node_id: str, root: bytes, signature: bytes) -> bool:
        key = (node_id, root, signature)
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        public_key = self._node_keys(node_id)
        if public_key is None or not public_key.verify(canonical.operation_batch_payload(root), signature):
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
    # The serialised `Block`, once known (set by `encode`, or given by whoever parsed it).
    encoded: bytes | None = field(default=None, compare=False, repr=False)

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
        """The serialised `Block` (computed once, from the operations' own serialisations: the same
        bytes as `to_proto().SerializeToString()`, without building the message)."""
        encoded = self.encoded
        if encoded is None:
            parts = [_length_delimited(_BLOCK_HEADER_BYTES_TAG, self.head.header_bytes)]
            parts.extend(_length_delimited(_BLOCK_OPERATIONS_TAG, op.encode()) for op in self.operations)
            parts.extend(
                _length_delimited(_BLOCK_SIGNATURES_TAG, signature.SerializeToString()) for signature in self.signatures
            )
            encoded = b"".join(parts)
            object.__setattr__(self, "encoded", encoded)
        return encoded

    @classmethod
    def from_proto(cls, block: chain_pb2.Block, encoded: bytes | None = None) -> BlockView:
        """`encoded`: the serialised `block`, when the caller has it (kept for `encode`)."""
        head = BlockHeaderView.parse(block.header_bytes)
        operations = tuple(SignedOp.from_proto(op) for op in block.operations)
        return cls(head, operations, tuple(block.signatures), encoded)

    @classmethod
    def decode(cls, data: bytes) -> BlockView:
        try:
            return cls.from_proto(chain_pb2.Block.FromString(data), data)
        except DecodeError as exc:
            raise InvalidBlock(f"block does not parse: {exc}") from exc

    def with_signatures(self, signatures: Iterable[chain_pb2.BlockSignature]) -> BlockView:
        return BlockView(self.head, self.operations, tuple(sorted(signatures, key=lambda s: s.node_id)))


# Tags of the length-delimited fields of `Block` (field number << 3 | wire type 2).
_BLOCK_HEADER_BYTES_TAG = b"\x0a"
_BLOCK_OPERATIONS_TAG = b"\x12"
_BLOCK_SIGNATURES_TAG = b"\x1a"
# `PendingOperations.operations` (1) and `ChainEvent.pending_batch` (6).
_PENDING_OPERATIONS_TAG = b"\x0a"
_EVENT_PENDING_BATCH_TAG = b"\x32"


_length_delimited = wire.length_delimited


def block_event_bytes(block: BlockView) -> bytes:
    """A serialised `ChainEvent` holding `block` (field 1), from the block's serialisation."""
    return _length_delimited(_BLOCK_HEADER_BYTES_TAG, block.encode())


def pending_batch_event_bytes(ops: Iterable[SignedOp]) -> bytes:
    """A serialised `ChainEvent` holding these operations as a `pending_batch` (field 6 of the event,
    field 1 of `PendingOperations`), from the operations' serialisations."""
    batch = b"".join(_length_delimited(_PENDING_OPERATIONS_TAG, op.encode()) for op in ops)
    return _length_delimited(_EVENT_PENDING_BATCH_TAG, batch)


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
    signature = sign_payload(keypair, canonical.block_payload(head.header_bytes))
    return chain_pb2.BlockSignature(node_id=node_id, signature=signature)


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
    signature_verdict: Callable[[PublicKey, chain_pb2.BlockSignature], bool] | None = None,
) -> None:
    """Checks a (non-genesis) block against its predecessor: hash chain, operations and their hash,
    and valid signatures from a quorum of the chain nodes. Raises InvalidBlock saying what is wrong.
    `signature_verdict`: whether a signature verifies with that key, for a caller that already knows
    (each check is an Ed25519 verification otherwise)."""
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
    if any(op.operation.WhichOneof("kind") != "entry" for op in block.operations):
        raise InvalidBlock(f"{where}: blocks hold entry operations only")
    payload = canonical.block_payload(block.head.header_bytes)
    verify = signature_verdict or (lambda key, s: key.verify(payload, s.signature))
    signers = {
        s.node_id for s in block.signatures if (key := chain_node_keys.get(s.node_id)) is not None and verify(key, s)
    }
    if not has_quorum(len(signers)):
        raise InvalidBlock(f"{where}: {len(signers)} valid chain node signature(s) is not a quorum")
