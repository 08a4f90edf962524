"""The Kubernetes manifests under deploy/ validate against the Kubernetes JSON schemas vendored in
tests/k8s_schemas/ (strict: an unknown or misspelt field fails; no network), and fit together: probes on
/health, selectors that select the pods, the config and the registry URL where the container reads them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"


def _docs() -> dict[str, dict]:
    out = {}
    for f in sorted((REPO / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out[doc["kind"]] = doc
    return out


def _validate(doc: dict) -> None:
    schema = json.loads((SCHEMAS / f"{doc['kind'].lower()}.json").read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls(schema).validate(doc)


def test_every_manifest_validates_against_its_kubernetes_schema():
    docs = _docs()
    assert set(docs) == {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "InferencePool"}
    for doc in docs.values():
        _validate(doc)


@pytest.mark.parametrize("kind, path, value", [
    ("Deployment", ("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "pth"), "/health"),
    ("Deployment", ("spec", "replica"), 2),
    ("Service", ("spec", "ports", 0, "port"), "eighty"),
    ("InferencePool", ("spec", "targetPortNumber"), 8000),
])
def test_the_schemas_refuse_a_broken_manifest(kind, path, value):
    doc = copy.deepcopy(_docs()[kind])
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)


def test_the_manifests_fit_together():
    docs = _docs()
    dep, svc, pool = docs["Deployment"], docs["Service"], docs["InferencePool"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    http = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert pool["spec"]["targetPorts"] == [{"number": http}] and f"{http}" in c["args"]
    refs = {next(iter(e.values()))["name"] for e in c["envFrom"]}
    assert refs == {docs["ConfigMap"]["metadata"]["name"], docs["Secret"]["metadata"]["name"]}
    assert docs["Secret"]["stringData"]["LORAPLEX_REGISTRY"].startswith("postgresql://")
    store = docs["ConfigMap"]["data"]["LORAPLEX_STORE"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claim = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert store.startswith(mounts[claim["name"]] + "/") and "$(LORAPLEX_STORE)" in c["args"]
    assert claim["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads it


def test_the_container_arguments_parse_as_loraplex_serve_flags():
    import argparse

    from loraplex.server.cli import serve_parser  # the parser `loraplex serve` uses

    docs = _docs()
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {**docs["ConfigMap"]["data"]}
    args = c["args"]
    for var in ("LORAPLEX_STORE", "LORAPLEX_MAX_LORAS"):  # Kubernetes expands $(VAR) from the container's env
        args = [a.replace(f"$({var})", env[var]) for a in args]
    p = argparse.ArgumentParser()
    serve_parser(p.add_subparsers(dest="cmd"))
    ns = p.parse_args(args)
    assert ns.cmd == "serve" and str(ns.store) == env["LORAPLEX_STORE"] and ns.host == "0.0.0.0"
