"""Regenerates the Python code of the gRPC API from protos/loraplex/v1/*.proto.

    make protos                                 # same as the next line
    python -m loraplex.protos.generate          # rewrite the checked-in *_pb2*.py(i)
    python -m loraplex.protos.generate --check  # exit 1 if they are stale

protoc runs with `-I protos/`, so a file's proto path is `loraplex/v1/x.proto`
(what reflection serves and what other protos import), and the generated
modules import each other as `loraplex.v1.x_pb2`. Those modules live in the
package `loraplex.protos.loraplex.v1`, so the imports are rewritten to it.
The output depends on the grpcio-tools version, which the `test` extra pins.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "loraplex" / "v1"
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
_IMPORT = re.compile(r"^from loraplex\.v1 import", re.M)


def generate(out_root: Path) -> dict[str, str]:
    """Generates into out_root; returns {file name: text} of the modules for PROTO_DIR."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit("grpcio-tools is needed: pip install -e '.[test]'") from e

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(p.relative_to(HERE)) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = {}
    for pattern in GENERATED:
        for f in sorted((out_root / "loraplex" / "v1").glob(pattern)):
            out[f.name] = _IMPORT.sub("from loraplex.protos.loraplex.v1 import", f.read_text())
    return out


def checked_in() -> dict[str, str]:
    return {f.name: f.read_text() for pattern in GENERATED for f in sorted(PROTO_DIR.glob(pattern))}


def stale_files() -> list[str]:
    """Generated files that differ from, are missing from or are not produced by a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    have = checked_in()
    return sorted(n for n in fresh.keys() | have.keys() if fresh.get(n) != have.get(n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loraplex.protos.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the checked-in code differs from a fresh generation")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated code in {PROTO_DIR}: {', '.join(stale)}; run `make protos`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    for name in checked_in().keys() - fresh.keys():  # left over from a removed .proto
        (PROTO_DIR / name).unlink()
    for name, text in fresh.items():
        (PROTO_DIR / name).write_text(text)
    print("regenerated:", ", ".join(sorted(fresh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
