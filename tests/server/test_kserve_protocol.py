"""Our ``inference`` protos against tritonclient's compiled ones, message by message, field by field.

Both are compared as FileDescriptorProtos (plain data): ours from ``protoc --descriptor_set_out``,
tritonclient's serialized in a child process (see ``kserve_harness``), so neither set of
generated modules is imported here. Every message, enum and RPC we declare must match upstream
in name, number, type, label and oneof; upstream may have more (we declare a subset).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2 as d
from grpc_tools import protoc

from tests.server.kserve_harness import Triton

PROTOS = Path(__file__).resolve().parents[2] / "protos"
Files = dict[str, d.FileDescriptorProto]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Files:
    out = tmp_path_factory.mktemp("descriptors") / "inference.pb"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        "inference/grpc_service.proto",
    ]
    assert protoc.main(args) == 0
    files = d.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files if f.package == "inference"}


@pytest.fixture(scope="module")
def upstream() -> Files:
    triton = Triton()
    try:
        found = triton.descriptors()
    finally:
        triton.close()
    return {name: d.FileDescriptorProto.FromString(data) for name, data in found.items()}


def messages(files: Files) -> dict[str, d.DescriptorProto]:
    def walk(prefix: str, items: Iterator[d.DescriptorProto]) -> Iterator[tuple[str, d.DescriptorProto]]:
        for message in items:
            name = f"{prefix}.{message.name}"
            yield name, message
            yield from walk(name, iter(message.nested_type))

    return {name: m for f in files.values() for name, m in walk(f".{f.package}", iter(f.message_type))}


def enums(files: Files) -> dict[str, d.EnumDescriptorProto]:
    found = {f".{f.package}.{e.name}": e for f in files.values() for e in f.enum_type}
    for name, message in messages(files).items():
        found.update({f"{name}.{e.name}": e for e in message.enum_type})
    return found


def methods(files: Files) -> dict[str, d.MethodDescriptorProto]:
    return {f".{f.package}.{s.name}/{m.name}": m for f in files.values() for s in f.service for m in s.method}


def differences(ours: Files, upstream: Files) -> list[str]:
    """Every way our declarations differ from upstream's (empty: they match)."""
    problems = []
    theirs = messages(upstream)
    for name, message in messages(ours).items():
        if name not in theirs:
            problems.append(f"message {name}: not upstream")
            continue
        other = theirs[name]
        their_fields = {f.name: f for f in other.field}
        for field in message.field:
            where = f"{name}.{field.name}"
            match = their_fields.get(field.name)
            if match is None:
                problems.append(f"{where}: not upstream")
                continue
            for attribute in ("number", "type", "label", "type_name"):
                mine, upstream_value = getattr(field, attribute), getattr(match, attribute)
                if mine != upstream_value:
                    problems.append(f"{where}: {attribute} {mine!r}, upstream {upstream_value!r}")
            if field.HasField("oneof_index") != match.HasField("oneof_index"):
                problems.append(f"{where}: oneof membership differs")
            elif field.HasField("oneof_index"):
                mine_oneof = message.oneof_decl[field.oneof_index].name
                their_oneof = other.oneof_decl[match.oneof_index].name
                if mine_oneof != their_oneof:
                    problems.append(f"{where}: in oneof {mine_oneof!r}, upstream {their_oneof!r}")
        if message.options.map_entry != other.options.map_entry:
            problems.append(f"message {name}: map entry differs")
    their_enums = enums(upstream)
    for name, enum in enums(ours).items():
        if name not in their_enums:
            problems.append(f"enum {name}: not upstream")
            continue
        their_values = {v.name: v.number for v in their_enums[name].value}
        for value in enum.value:
            if their_values.get(value.name) != value.number:
                problems.append(
                    f"enum {name}.{value.name} = {value.number}, upstream {their_values.get(value.name)}"
                )
    their_methods = methods(upstream)
    for name, method in methods(ours).items():
        other_method = their_methods.get(name)
        if other_method is None:
            problems.append(f"rpc {name}: not upstream")
            continue
        for attribute in ("input_type", "output_type", "client_streaming", "server_streaming"):
            if getattr(method, attribute) != getattr(other_method, attribute):
                problems.append(f"rpc {name}: {attribute} differs")
    return problems


def test_our_inference_protos_match_tritonclient(ours: Files, upstream: Files) -> None:
    assert differences(ours, upstream) == []


def test_we_declare_the_protocol_surface(ours: Files) -> None:
    """The RPCs PROTOCOL.md lists, and the messages they need, are all declared (so compared)."""
    declared = {name.split("/")[1] for name in methods(ours)}
    assert declared >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    assert len(messages(ours)) >= 40 and ".inference.ModelConfig" in messages(ours)


def test_the_comparison_catches_a_drift(ours: Files, upstream: Files) -> None:
    drifted = copy.deepcopy(ours)
    service = next(f for f in drifted.values() if f.service)
    infer_request = next(m for m in service.message_type if m.name == "ModelInferRequest")
    next(f for f in infer_request.field if f.name == "raw_input_contents").number = 8
    next(m for m in service.service[0].method if m.name == "ModelStreamInfer").server_streaming = False
    assert differences(drifted, upstream) == [
        ".inference.ModelInferRequest.raw_input_contents: number 8, upstream 7",
        "rpc .inference.GRPCInferenceService/ModelStreamInfer: server_streaming differs",
    ]
