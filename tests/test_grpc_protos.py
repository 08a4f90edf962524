"""The checked-in gRPC code matches the .proto files (regenerated into a temp dir and compared)."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("grpc_tools")

from loraplex.protos import generate  # noqa: E402


def test_checked_in_code_is_fresh():
    assert generate.stale_files() == [], "run `make protos` and commit the result"
    assert generate.main(["--check"]) == 0


def test_check_fails_on_an_edited_proto(tmp_path, monkeypatch, capsys):
    # A copy of protos/ with one field added: the same checked-in code is now stale.
    root = tmp_path / "protos"
    shutil.copytree(generate.HERE / "loraplex", root / "loraplex")
    proto = root / "loraplex" / "v1" / "loraplex.proto"
    proto.write_text(proto.read_text().replace("message ListModelsRequest {}", "message ListModelsRequest { string filter = 1; }"))
    monkeypatch.setattr(generate, "HERE", root)
    monkeypatch.setattr(generate, "PROTO_DIR", root / "loraplex" / "v1")
    assert set(generate.stale_files()) == {"loraplex_pb2.py", "loraplex_pb2.pyi"}
    assert generate.main(["--check"]) == 1
    assert "make protos" in capsys.readouterr().err
    # regenerating fixes it, and a left-over module of a removed .proto is removed
    (root / "loraplex" / "v1" / "gone_pb2.py").write_text("# stale\n")
    assert generate.main([]) == 0
    assert generate.stale_files() == []
    assert not (root / "loraplex" / "v1" / "gone_pb2.py").exists()


def test_generated_modules_import_under_the_loraplex_namespace():
    from loraplex.protos.loraplex.v1 import loraplex_pb2, loraplex_pb2_grpc

    src = (generate.PROTO_DIR / "loraplex_pb2_grpc.py").read_text()
    assert "from loraplex.protos.loraplex.v1 import loraplex_pb2" in src
    assert "from loraplex.v1 import" not in src
    assert loraplex_pb2.DESCRIPTOR.name == "loraplex/v1/loraplex.proto"
    assert loraplex_pb2.DESCRIPTOR.package == "loraplex.v1"
    assert {"Inference", "Admin"} <= set(loraplex_pb2.DESCRIPTOR.services_by_name)
    assert hasattr(loraplex_pb2_grpc, "InferenceStub") and hasattr(loraplex_pb2_grpc, "AdminStub")
