"""Rebuilds the vendored Kubernetes JSON schemas (self-contained, strict) from the `kubernetes-validate` wheel:

    pip download --no-deps kubernetes-validate==1.37.0 && unzip -q kubernetes_validate-*.whl -d /tmp/kv
    python tests/k8s_schemas/vendor.py /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict

Each output file is one kind's schema with only the definitions it reaches, so tests validate offline.
"""
import json
import sys
from pathlib import Path

KINDS = {"deployment-apps-v1": "Deployment", "service-v1": "Service", "configmap-v1": "ConfigMap", "secret-v1": "Secret",
         "persistentvolumeclaim-v1": "PersistentVolumeClaim"}


def main(src: str) -> None:
    src_dir, out = Path(src), Path(__file__).parent
    defs = json.loads((src_dir / "_definitions.json").read_text())["$defs"]
    for stem, kind in KINDS.items():
        top = json.loads((src_dir / f"{stem}.json").read_text())
        needed: dict = {}

        def walk(node):
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and "#/$defs/" in ref:
                    key = ref.split("#/$defs/", 1)[1]
                    node["$ref"] = f"#/$defs/{key}"
                    if key not in needed:
                        needed[key] = json.loads(json.dumps(defs[key]))
                        walk(needed[key])
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(top)
        top["$defs"] = dict(sorted(needed.items()))
        (out / f"{kind.lower()}.json").write_text(json.dumps(top, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
