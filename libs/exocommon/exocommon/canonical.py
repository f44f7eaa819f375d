"""The one place that defines the bytes of anything hashed or signed.

Anything that is hashed or signed must get its bytes from a function here, so that two nodes
(or two versions of this code) never disagree about what was signed.

Signing payloads are domain separated: ``b"exocore/" + <domain> + b"\\x00" + <body>``. The domain
names what is signed and its format version, so a signature made for one purpose (e.g. an
operation) can never be replayed as another (e.g. a block). The NUL byte ends the domain; domains
are ASCII constants below and never contain NUL, so the framing is unambiguous.

Exception — auth tokens: to stay compatible with the original (SPEC 1.11) and with clients that
produce tokens themselves, an auth token signature is plain Ed25519 over the raw encoded
``AuthTokenData`` bytes, with NO domain prefix (see `auth_token_signing_payload`).
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from exocommon.errors import InvalidArgument
from exocommon.hashing import multihash_sha3_256

_PREFIX = b"exocore/"
_SEPARATOR = b"\x00"

# Domains (bump the version suffix whenever the body format of a domain changes).
OPERATION = "operation/v1"
BLOCK = "block/v1"
GENESIS = "genesis/v1"
PEER_ENVELOPE = "peer-envelope/v1"

DOMAINS = frozenset({OPERATION, BLOCK, GENESIS, PEER_ENVELOPE})


def deterministic_bytes(msg: Message) -> bytes:
    """Protobuf bytes with deterministic map ordering, for hashing/signing a message.

    Only stable within one protobuf runtime and schema; for data that is verified by other nodes,
    hash/sign the bytes that were actually transmitted and stored rather than re-serializing.
    """
    return msg.SerializeToString(deterministic=True)


def signing_payload(domain: str, body: bytes) -> bytes:
    """The exact bytes to sign (and verify) for `body` in `domain`."""
    if domain not in DOMAINS:
        # A typo'd domain would silently create signatures nobody verifies; refuse it.
        raise InvalidArgument(f"unknown signing domain {domain!r}")
    return _PREFIX + domain.encode("ascii") + _SEPARATOR + bytes(body)


def operation_batch_payload(merkle_root: bytes) -> bytes:
    """What a node signs for a batch of operations: the Merkle root of their hashes."""
    return signing_payload(OPERATION, merkle_root)


def block_payload(header_bytes: bytes) -> bytes:
    """What a chain node signs to vote for a block: the exact header bytes."""
    return signing_payload(BLOCK, header_bytes)


def genesis_payload(header_bytes: bytes) -> bytes:
    """What the cell key signs in the genesis block."""
    return signing_payload(GENESIS, header_bytes)


def peer_envelope_payload(cell_id: str, from_node_id: str, to_node_id: str, sent_at: int, message: bytes) -> bytes:
    """What a chain node signs to send a message to another: who, to whom, when and what."""
    body = b"".join(
        [
            _length_prefixed(cell_id.encode()),
            _length_prefixed(from_node_id.encode()),
            _length_prefixed(to_node_id.encode()),
            sent_at.to_bytes(8, "little"),
            message,
        ]
    )
    return signing_payload(PEER_ENVELOPE, body)


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


# Merkle tree over operation hashes (leaves and inner nodes are domain separated so a leaf can
# never pass for an inner node). An odd node at the end of a level is carried up unchanged.
def merkle_leaf(operation_hash: bytes) -> bytes:
    return hashlib.sha3_256(b"\x00" + operation_hash).digest()


def merkle_parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha3_256(b"\x01" + left + right).digest()


def merkle_root_and_proofs(operation_hashes: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over `operation_hashes` and, for each, its sibling path up to the root."""
    if not operation_hashes:
        raise InvalidArgument("a Merkle tree needs at least one leaf")
    level = [merkle_leaf(h) for h in operation_hashes]
    positions = list(range(len(level)))  # index of each leaf's ancestor in the current level
    proofs: list[list[bytes]] = [[] for _ in operation_hashes]
    while len(level) > 1:
        for leaf, position in enumerate(positions):
            sibling = position ^ 1
            if sibling < len(level):
                proofs[leaf].append(level[sibling])
        level = [
            merkle_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
        ]
        positions = [p // 2 for p in positions]
    return level[0], proofs


def merkle_root_from_proof(operation_hash: bytes, index: int, size: int, proof: list[bytes]) -> bytes | None:
    """The root that `proof` leads to from leaf `index` of `size`; None if the proof's shape is wrong."""
    if not 0 <= index < size:
        return None
    node = merkle_leaf(operation_hash)
    steps = iter(proof)
    while size > 1:
        if index % 2 == 1:
            node = merkle_parent(next(steps, b""), node)
        elif index + 1 < size:
            node = merkle_parent(node, next(steps, b""))
        index //= 2
        size = (size + 1) // 2
    if next(steps, None) is not None:
        return None
    return node


def operations_hash(operation_hashes: list[bytes]) -> bytes:
    """A block's operations hash: multihash over the concatenated operation hashes, in id order."""
    return multihash_sha3_256(b"".join(operation_hashes))


def auth_token_signing_payload(encoded_token_data: bytes) -> bytes:
    """Auth tokens sign the raw encoded AuthTokenData bytes, no domain (original format, SPEC 1.11)."""
    return bytes(encoded_token_data)


__all__ = [
    "BLOCK",
    "DOMAINS",
    "GENESIS",
    "OPERATION",
    "PEER_ENVELOPE",
    "block_payload",
    "genesis_payload",
    "merkle_leaf",
    "merkle_parent",
    "merkle_root_and_proofs",
    "merkle_root_from_proof",
    "operation_batch_payload",
    "operations_hash",
    "peer_envelope_payload",
    "auth_token_signing_payload",
    "deterministic_bytes",
    "signing_payload",
]
