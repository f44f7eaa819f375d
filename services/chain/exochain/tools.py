"""Chain tools for the CLI: write the genesis block, validate a whole chain, read one from a running
service. Storage and gRPC are the caller's (or `blocks_from_service`'s); nothing here runs the engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from exochain.core.common import ChainCell
from exochain.model import BlockView, SignatureChecker, build_genesis, validate_block, validate_genesis
from exochain.storage.base import ChainStore
from exocommon.errors import AlreadyExists, ExocoreError, Internal, InvalidArgument, Unavailable
from exocommon.grpc_util import DEFAULT_MAX_MESSAGE_BYTES, exception_from_rpc_error
from exocommon.keys import Keypair
from exocore.chain.v1 import chain_pb2, chain_pb2_grpc

SERVICE_PAGE_BLOCKS = 100
SERVICE_DEADLINE_S = 10.0


@dataclass(frozen=True)
class ChainSummary:
    blocks: int
    height: int
    last_offset: int

    def describe(self) -> str:
        return f"chain valid: {self.blocks} blocks, height {self.height}, last offset {self.last_offset}"


class InvalidChain(InvalidArgument):
    """The first block of a chain that does not validate."""

    def __init__(self, offset: int | None, height: int | None, reason: str) -> None:
        self.offset = offset
        self.height = height
        self.reason = reason
        where = "chain" if offset is None else f"block at offset {offset} (height {height})"
        super().__init__(f"chain invalid: {where}: {reason}")


def write_genesis(chain: ChainStore, cell_id: str, cell_keypair: Keypair) -> BlockView:
    """Writes the genesis block of an empty chain; AlreadyExists if it has a block."""
    if chain.last_block() is not None:
        raise AlreadyExists(
            f"the chain of cell {cell_id} already has {chain.block_count()} block(s); "
            "`chain init` only creates the genesis block of an empty chain"
        )
    genesis = build_genesis(cell_id, cell_keypair)
    chain.write_block(genesis)
    return genesis


def check_chain(blocks: Iterable[BlockView], cell: ChainCell) -> ChainSummary:
    """Validates `blocks` (the whole chain, from the genesis, in order): the genesis with the cell key,
    then each block against its predecessor (hash chain, operations, quorum of chain node
    signatures) and the signature of each operation by its node. Raises InvalidChain at the first
    problem."""
    checker = SignatureChecker(cell.member_key)
    previous: BlockView | None = None
    count = 0
    iterator = iter(blocks)
    while True:
        try:
            block = next(iterator, None)
        except (InvalidArgument, Internal) as exc:  # undecodable stored or served bytes
            after = "" if previous is None else f" after offset {previous.offset}"
            raise InvalidChain(None, None, f"cannot read the block{after}: {exc}") from None
        if block is None:
            break
        try:
            if previous is None:
                validate_genesis(block, cell.cell_id, cell.cell_public_key)
            else:
                validate_block(block, previous.head, cell.chain_node_keys, cell.has_quorum)
            for op in block.operations:
                if not checker.verify(op):
                    raise InvalidArgument(f"operation {op.operation_id} is not signed by its node {op.node_id}")
        except ExocoreError as exc:
            raise InvalidChain(block.offset, block.height, str(exc)) from None
        previous = block
        count += 1
    if previous is None:
        raise InvalidChain(None, None, "no genesis block (create it with `exo cell chain init`)")
    return ChainSummary(count, previous.height, previous.offset)


def blocks_from_service(address: str, deadline_s: float = SERVICE_DEADLINE_S) -> Iterator[BlockView]:
    """Every block of the chain served by the chain service at `address` (ChainLog.GetBlocks pages)."""
    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = chain_pb2_grpc.ChainLogStub(channel)
        offset = 0
        while True:
            try:
                response = stub.GetBlocks(
                    chain_pb2.GetBlocksRequest(from_offset=offset, max_count=SERVICE_PAGE_BLOCKS), timeout=deadline_s
                )
            except grpc.RpcError as exc:
                error = exception_from_rpc_error(exc)
                raise Unavailable(f"chain service at {address}: {error}") from None
            if not response.blocks:
                return
            for proto in response.blocks:
                block = BlockView.from_proto(proto)
                yield block
                offset = block.next_offset


__all__ = ["ChainSummary", "InvalidChain", "blocks_from_service", "check_chain", "write_genesis"]
