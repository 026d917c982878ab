"""The generated stubs in server/pb are exactly what protos/generate.py makes from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():  # protos/ is not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    fresh = tmp_path / "pb"
    _load_generator().generate(fresh)
    committed = ROOT / "server" / "pb"
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert fresh_files == committed_files, "run `make protos`: the set of generated files changed"
    stale = [str(p) for p in sorted(fresh_files) if (fresh / p).read_bytes() != (committed / p).read_bytes()]
    assert not stale, f"run `make protos`: stale generated files {stale}"


def test_every_proto_is_versioned_or_kserve() -> None:
    protos = sorted(p.relative_to(ROOT / "protos").as_posix() for p in (ROOT / "protos").rglob("*.proto"))
    assert protos, "no .proto files found"
    for proto in protos:
        assert proto.startswith(("fineserve/v1/", "inference/")), proto


def test_generated_modules_import_and_declare_services() -> None:
    from fineserve.server.pb.fineserve.v1 import fineserve_pb2

    service = fineserve_pb2.DESCRIPTOR.services_by_name["Fineserve"]
    assert [m.name for m in service.methods] == ["Classify", "AnalyzeSentiment", "ListModels"]
