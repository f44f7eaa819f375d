"""The generated stubs import, keep the original's wire contract, and every service is reachable
through server reflection."""

import importlib
import pkgutil

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import exocore
from exocommon.grpc_util import ServiceServer
from exocore.apps.v1 import app_host_pb2_grpc
from exocore.chain.v1 import chain_pb2_grpc
from exocore.discovery.v1 import discovery_pb2_grpc
from exocore.store.v1 import entity_store_pb2_grpc

SERVICES = {
    "exocore.store.v1.EntityStore": (entity_store_pb2_grpc, "EntityStore"),
    "exocore.chain.v1.ChainPeer": (chain_pb2_grpc, "ChainPeer"),
    "exocore.chain.v1.ChainLog": (chain_pb2_grpc, "ChainLog"),
    "exocore.apps.v1.AppHost": (app_host_pb2_grpc, "AppHost"),
    "exocore.discovery.v1.Discovery": (discovery_pb2_grpc, "Discovery"),
}

# SPEC.md Appendix A: file, message full name -> {field: number}. Trait schemas, YAML configs and
# thin-client bodies written for the original depend on these never changing.
ORIGINAL_FIELDS = {
    ("exocore/store/entity.proto", "exocore.store.Entity"): dict(
        id=1, traits=4, creation_date=5, modification_date=6, deletion_date=7, last_operation_id=8
    ),
    ("exocore/store/entity.proto", "exocore.store.Trait"): dict(
        id=1, message=2, creation_date=3, modification_date=4, deletion_date=6, last_operation_id=7, details=5
    ),
    ("exocore/store/entity.proto", "exocore.store.Reference"): dict(entity_id=1, trait_id=2),
    ("exocore/store/mutation.proto", "exocore.store.MutationRequest"): dict(
        mutations=1, wait_indexed=2, return_entities=3, common_entity_id=4
    ),
    ("exocore/store/mutation.proto", "exocore.store.MutationResult"): dict(operation_ids=1, entities=2),
    ("exocore/store/mutation.proto", "exocore.store.EntityMutation"): dict(
        entity_id=1, put_trait=2, delete_trait=3, delete_entity=4, delete_operations=7, test=99
    ),
    ("exocore/store/mutation.proto", "exocore.store.CommittedEntityMutation"): dict(
        block_offset=1, operation_id=2, mutation=3
    ),
    ("exocore/store/query.proto", "exocore.store.EntityQuery"): dict(
        match=1, trait=2, ids=3, reference=4, operations=10, all=11, boolean=14, query_string=15, test=99,
        projections=7, paging=5, ordering=6, watch_token=8, result_hash=9, include_deleted=12, programmatic=13,
    ),
    ("exocore/store/query.proto", "exocore.store.Projection"): dict(package=1, skip=2, field_ids=4, field_group_ids=5),
    ("exocore/store/query.proto", "exocore.store.BooleanPredicate.SubQuery"): dict(
        occur=1, match=2, trait=3, ids=4, reference=5, operations=6, all=7, boolean=8
    ),
    ("exocore/store/query.proto", "exocore.store.TraitFieldPredicate"): dict(
        field=1, string=2, int64=3, uint64=4, date=5, operator=6
    ),
    ("exocore/store/query.proto", "exocore.store.Paging"): dict(
        after_ordering_value=1, before_ordering_value=2, count=3, offset=4
    ),
    ("exocore/store/query.proto", "exocore.store.Ordering"): dict(
        score=1, operation_id=2, field=3, created_at=7, updated_at=8, ascending=4, no_recency_boost=5,
        no_reference_boost=6,
    ),
    ("exocore/store/query.proto", "exocore.store.OrderingValue"): dict(
        float=1, uint64=2, date=3, min=4, max=5, operation_id=6
    ),
    ("exocore/store/query.proto", "exocore.store.EntityResults"): dict(
        entities=1, skipped_hash=2, estimated_count=3, current_page=4, next_page=5, hash=6
    ),
    ("exocore/store/query.proto", "exocore.store.EntityResult"): dict(entity=1, source=2, ordering_value=3, hash=4),
    ("exocore/core/auth.proto", "exocore.core.AuthTokenData"): dict(
        cell_id=1, node_id=2, signature_date=3, expiration_date=4
    ),
    ("exocore/core/config.proto", "exocore.core.LocalNodeConfig"): dict(
        keypair=1, public_key=2, name=3, id=4, listen_addresses=10, addresses=6, cells=7, store=8, chain=9
    ),
    ("exocore/core/config.proto", "exocore.core.EntityIndexConfig"): dict(
        chain_index_min_depth=1, chain_index_depth_leeway=2, chain_index_deferred_interval_secs=6,
        chain_index_deferred_query_secs=7, chain_index_deferred_max_secs=8, chain_index_deferred_write_secs=9,
        chain_index_deferred_max_pending=10, pending_index=3, chain_index=4, garbage_collector=5,
    ),
    ("exocore/core/config.proto", "exocore.core.CellConfig"): dict(
        public_key=1, keypair=2, name=3, id=4, nodes=6, apps=7
    ),
    ("exocore/core/config.proto", "exocore.core.CellApplicationConfig"): dict(
        name=1, version=2, public_key=3, package_url=4, inline=5
    ),
    ("exocore/apps/manifest.proto", "exocore.apps.Manifest"): dict(
        name=1, version=2, public_key=3, schemas=4, module=5
    ),
    ("exocore/apps/runtime.proto", "exocore.apps.InMessage"): dict(type=1, rendez_vous_id=2, data=3, error=4),
    ("exocore/apps/runtime.proto", "exocore.apps.OutMessage"): dict(type=1, rendez_vous_id=2, data=3),
}

OPTION_EXTENSIONS = {"indexed": 1373, "sorted": 1374, "text": 1375, "field_group": 1376, "short_name": 1377}


def test_every_generated_module_imports():
    names = [m.name for m in pkgutil.walk_packages(exocore.__path__, "exocore.")]
    modules = [n for n in names if n.endswith(("_pb2", "_pb2_grpc"))]
    assert len(modules) >= 2 * 14
    for name in modules:
        importlib.import_module(name)


@pytest.mark.parametrize(("location", "fields"), ORIGINAL_FIELDS.items(), ids=lambda v: str(v))
def test_original_messages_keep_paths_names_and_numbers(location, fields):
    path, full_name = location
    message = descriptor_pool.Default().FindMessageTypeByName(full_name)
    assert message.file.name == path
    numbers = {f.name: f.number for f in message.fields}
    for name, number in fields.items():
        assert numbers.get(name) == number, f"{full_name}.{name}"


def test_option_extensions_keep_their_numbers():
    options_file = descriptor_pool.Default().FindFileByName("exocore/store/options.proto")
    assert options_file.package == "exocore"
    assert {n: e.number for n, e in options_file.extensions_by_name.items()} == OPTION_EXTENSIONS


async def test_every_service_descriptor_loads_through_reflection():
    registrations = []
    for full_name, (module, name) in SERVICES.items():
        servicer = getattr(module, f"{name}Servicer")()
        registrations.append((getattr(module, f"add_{name}Servicer_to_server"), servicer, full_name))
    server = ServiceServer("protos-test", "127.0.0.1:0", registrations, drain_delay_s=0)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask(request: reflection_pb2.ServerReflectionRequest):
                async for response in stub.ServerReflectionInfo(iter([request])):
                    return response

            listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
            names = {s.name for s in listed.list_services_response.service}
            assert set(SERVICES) <= names
            assert "grpc.health.v1.Health" in names

            for full_name in SERVICES:
                response = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=full_name))
                pool = descriptor_pool.DescriptorPool()
                protos = [
                    descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for raw in response.file_descriptor_response.file_descriptor_proto
                ]
                # Add dependencies first: reflection returns the file and its transitive imports.
                pending = {p.name: p for p in protos}
                while pending:
                    for name, proto in list(pending.items()):
                        if all(dep not in pending for dep in proto.dependency):
                            pool.Add(proto)
                            del pending[name]
                reflected = pool.FindServiceByName(full_name)
                generated = descriptor_pool.Default().FindServiceByName(full_name)
                assert [m.name for m in reflected.methods] == [m.name for m in generated.methods]
                assert [m.input_type.full_name for m in reflected.methods] == [
                    m.input_type.full_name for m in generated.methods
                ]
                assert len(reflected.methods) > 0
    finally:
        await server.stop()
