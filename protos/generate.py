"""Regenerates the Python code of the gRPC API from protos/loraplex/v1/*.proto.

    python -m loraplex.protos.generate          # rewrite the checked-in *_pb2*.py
    python -m loraplex.protos.generate --check  # exit 1 if they are stale

The generated modules import each other as `loraplex.v1.x_pb2`; we rewrite
that to the package they live in, `loraplex.protos.loraplex.v1`.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "loraplex" / "v1"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(p.relative_to(HERE)) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = []
    for f in sorted((out_root / "loraplex" / "v1").glob("*_pb2*.py*")):
        text = f.read_text()
        text = re.sub(r"^from loraplex\.v1 import", "from loraplex.protos.loraplex.v1 import", text, flags=re.M)
        f.write_text(text)
        out.append(f)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loraplex.protos.generate")
    ap.add_argument("--check", action="store_true", help="fail if the checked-in code differs from a fresh generation")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            dest = PROTO_DIR / f.name
            fresh = f.read_text()
            if args.check:
                if not dest.exists() or dest.read_text() != fresh:
                    stale.append(dest.name)
            else:
                dest.write_text(fresh)
        if args.check and stale:
            print(f"stale generated code: {stale}; run `make protos`", file=sys.stderr)
            return 1
    if not args.check:
        print("regenerated:", ", ".join(f.name for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
