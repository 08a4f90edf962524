"""The adapter store: versions on disk + SQLite, validation against the base, weights equal to PEFT's,
refusals that leave nothing behind, concurrency across threads and processes, routes, restart."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters_store import (
    AdapterConflict, AdapterNotFound, AdapterPathForbidden, AdapterStore, InvalidAdapter, InvalidRequest, StoreError,
    load_adapter_weights, load_score_head, validate_adapter_dir,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def spec(tiny_base):
    from helpers import base_spec_for

    return base_spec_for(tiny_base, model_id="tiny-llama")


@pytest.fixture(scope="module")
def patterned(tiny_base, tmp_path_factory):
    """rank_pattern and alpha_pattern, as PEFT matches them."""
    from helpers import make_peft_adapter

    return make_peft_adapter(
        tiny_base, tmp_path_factory.mktemp("patterned") / "p", r=4, alpha=8, seed=7,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 12}, alpha_pattern={"v_proj": 3})


@pytest.fixture
def store(tmp_path, spec):
    st = AdapterStore(tmp_path / "store", base=spec)
    yield st
    st.close()


def snapshot(st: AdapterStore):
    """Everything a failed call must leave untouched: rows, counters, routes, events, files."""
    with sqlite3.connect(st.db_path) as c:
        counters = c.execute("SELECT name, next_version FROM counters ORDER BY name").fetchall()
        routes = c.execute("SELECT * FROM routes ORDER BY name").fetchall()
        history = c.execute("SELECT COUNT(*) FROM route_history").fetchone()[0]
    files = sorted(str(p.relative_to(st.root)) for p in st.root.rglob("*") if not p.name.startswith("registry.sqlite3"))
    return [v.ref for v in st.list()], counters, routes, history, st.last_event_seq(), files


def copy_adapter(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


# --- versions -------------------------------------------------------------------------------------
def test_register_get_list_versions_delete_and_numbers_never_reused(store, spec, adapter_dirs):
    lineage = {"method": "sft", "seed": 3, "dataset_sha256": {"train": "ab" * 32}}
    v1 = store.register("bot", adapter_dirs["alpha"], lineage=lineage, caller="alice")
    v2 = store.register("bot", adapter_dirs["beta"])
    o1 = store.register("other.v-2_x", adapter_dirs["delta"])
    assert (v1.ref, v2.ref, o1.ref) == ("bot@1", "bot@2", "other.v-2_x@1")
    assert v1.path == store.root / "adapters" / "bot" / "1"
    assert sorted(p.name for p in v1.path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (v1.path / "adapter_model.safetensors").read_bytes() == (adapter_dirs["alpha"] / "adapter_model.safetensors").read_bytes()
    assert v1.lineage == lineage and v1.base_fingerprint == spec.fingerprint and len(v1.sha256) == 64
    assert v1.manifest.r == 4 and v2.manifest.r == 8 and v1.manifest.kind == "lora"
    assert v1.created_at <= v2.created_at <= time.time()
    assert store.get("bot") == v2 and store.get("bot", 1) == v1
    assert [v.version for v in store.versions("bot")] == [1, 2]
    assert [v.ref for v in store.list()] == ["bot@1", "bot@2", "other.v-2_x@1"]
    assert store.names() == ["bot", "other.v-2_x"]
    with pytest.raises(AdapterNotFound, match=r"no version 7 .*\[1, 2\]"):
        store.get("bot", 7)
    with pytest.raises(AdapterNotFound, match="'ghost'"):
        store.get("ghost")
    with pytest.raises(AdapterNotFound):
        store.versions("ghost")

    assert [v.ref for v in store.delete("bot", 1, caller="bob")] == ["bot@1"]
    assert not v1.path.exists() and [v.version for v in store.versions("bot")] == [2]
    assert store.register("bot", adapter_dirs["alpha"]).version == 3  # 1 is never handed out again
    with pytest.raises(AdapterNotFound):
        store.delete("bot", 1)
    assert [v.ref for v in store.delete("bot")] == ["bot@2", "bot@3"]
    assert store.names() == ["other.v-2_x"] and not (store.root / "adapters" / "bot").exists()
    with pytest.raises(AdapterNotFound):
        store.delete("bot")
    assert store.register("bot", adapter_dirs["alpha"]).version == 4  # not even after deleting the whole name
    kinds = [(e.kind, e.name, e.version, e.caller) for e in store.events_since(0)]
    assert kinds[0] == ("registered", "bot", 1, "alice")
    assert ("deleted", "bot", 1, "bob") in kinds and kinds[-1] == ("registered", "bot", 4, "api")
    assert [e.seq for e in store.events_since(0)] == list(range(1, store.last_event_seq() + 1))


@pytest.mark.parametrize("which", ["alpha", "beta", "gamma", "delta", "patterned"])
def test_weights_and_scales_equal_peft(which, store, tiny_base, adapter_dirs, patterned):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    src = patterned if which == "patterned" else adapter_dirs[which]
    v = store.register(which, src)
    got = load_adapter_weights(v.path, v.manifest)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), str(src))
    want = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(got) == set(want) == set(v.manifest.module_ranks) == set(v.manifest.module_scales)
    for mod, (a, b) in got.items():
        layer = want[mod]
        assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight), mod
        assert v.manifest.module_ranks[mod] == layer.r["default"] == a.shape[0]
        assert v.manifest.module_scales[mod] == pytest.approx(layer.scaling["default"], rel=1e-12), mod
    assert b.abs().sum() > 0  # the builders give non-zero B
    if which == "patterned":
        ranks = v.manifest.module_ranks
        assert ranks["model.layers.0.mlp.down_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 12
        assert ranks["model.layers.0.self_attn.q_proj"] == 4
        assert v.manifest.module_scales["model.layers.0.self_attn.v_proj"] == pytest.approx(3 / 4)
    if which == "gamma":  # rsLoRA: alpha / sqrt(r)
        assert v.manifest.use_rslora and all(s == pytest.approx(8 / 4) for s in v.manifest.module_scales.values())
    half = load_adapter_weights(v.path, v.manifest, dtype=torch.bfloat16)
    assert all(a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 for a, b in half.values())


def test_validate_without_a_base_and_reward_adapters(store, tiny_base, tmp_path, adapter_dirs):
    from helpers import make_reward_adapter

    m = validate_adapter_dir(adapter_dirs["beta"], None)
    assert m.r == 8 and len(m.module_ranks) == 14 and m.kind == "lora"
    rd = make_reward_adapter(tiny_base, tmp_path / "rm", r=4, target_modules=["q_proj"], seed=5)
    v = store.register("judge", rd)
    assert v.manifest.kind == "reward" and v.manifest.extra["score_hidden"] == 64
    head = load_score_head(v.path)
    assert head["weight"].shape == (1, 64) and torch.equal(head["bias"], torch.tensor([0.25]))
    assert torch.equal(head["weight"], load_file(str(rd / "score_head.safetensors"))["weight"])
    assert load_score_head(store.get("judge").path.parent / "nowhere") is None


# --- refusals --------------------------------------------------------------------------------------
def _bad(kind: str, base: Path, good: Path, tmp: Path) -> tuple[Path, dict]:
    """A broken copy of `good`; returns (dir, register kwargs)."""
    d = copy_adapter(good, tmp / kind)
    w = d / "adapter_model.safetensors"
    kw: dict = {}
    if kind == "no-config":
        (d / "adapter_config.json").unlink()
    elif kind == "no-weights":
        w.unlink()
    elif kind == "pickle-bin":
        torch.save(load_file(str(w)), d / "adapter_model.bin")
        w.unlink()
    elif kind == "pickle-extra":
        torch.save({"step": 1}, d / "optimizer.pt")
    elif kind == "pickle-disguised":
        sd = load_file(str(w))
        w.unlink()
        torch.save(sd, w)
    elif kind == "not-safetensors":
        w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif kind == "ghost-module":
        sd = load_file(str(w))
        save_file({k.replace("layers.0.", "layers.7."): t for k, t in sd.items()}, str(w))
    elif kind == "not-linear":
        sd = load_file(str(w))
        save_file({k.replace("layers.0.self_attn.q_proj", "layers.0.input_layernorm"): t for k, t in sd.items()}, str(w))
    elif kind == "missing-B":
        sd = load_file(str(w))
        save_file({k: t for k, t in sd.items() if "layers.1.self_attn.v_proj.lora_B" not in k}, str(w))
    elif kind == "rank-vs-config":
        edit_config(d, r=6)
    elif kind == "nan":
        sd = load_file(str(w))
        k = sorted(sd)[0]
        sd[k][0, 0] = float("nan")
        save_file(sd, str(w))
    elif kind == "int-weights":
        sd = load_file(str(w))
        save_file({k: t.to(torch.int32) for k, t in sd.items()}, str(w))
    elif kind == "embedding-lora":
        sd = load_file(str(w))
        sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 10)
        save_file(sd, str(w))
    elif kind == "dora":
        edit_config(d, use_dora=True)
    elif kind == "bias":
        edit_config(d, bias="lora_only")
    elif kind == "lora-bias":
        edit_config(d, lora_bias=True)
    elif kind == "modules-to-save":
        edit_config(d, modules_to_save=["lm_head"])
    elif kind == "pissa":
        edit_config(d, init_lora_weights="pissa")
    elif kind == "not-lora":
        edit_config(d, peft_type="IA3")
    elif kind == "bad-json":
        (d / "adapter_config.json").write_text("{r: 4")
    elif kind == "fingerprint":
        edit_config(d, loraplex_base_fingerprint="sha256:" + "0" * 32)
    elif kind == "base-path":  # a local base with the same shapes but other weights
        other = Path(shutil.copytree(base, tmp / "other-base"))
        cfg = json.loads((other / "config.json").read_text())
        cfg["rms_norm_eps"] = 1e-3
        (other / "config.json").write_text(json.dumps(cfg))
        edit_config(d, base_model_name_or_path=str(other))
    elif kind == "lineage-base":
        kw["lineage"] = {"base_fingerprint": "sha256:" + "f" * 32}
    elif kind == "reward-no-head":
        edit_config(d, loraplex_kind="reward")
    elif kind == "reward-wrong-hidden":
        save_file({"weight": torch.zeros(1, 32)}, str(d / "score_head.safetensors"))
    elif kind == "unknown-kind":
        edit_config(d, loraplex_kind="vision")
    else:
        raise AssertionError(kind)
    return d, kw


BAD_ADAPTERS = {
    # kind: fragments the message must contain
    "no-config": ["missing adapter_config.json"],
    "no-weights": ["missing adapter_model.safetensors"],
    "pickle-bin": ["adapter_model.bin", "pickle"],
    "pickle-extra": ["optimizer.pt", "pickle"],
    "pickle-disguised": ["adapter_model.safetensors is a pickle"],
    "not-safetensors": ["adapter_model.safetensors is not a readable safetensors file"],
    "ghost-module": ["model.layers.7.self_attn.q_proj", "does not have"],
    "not-linear": ["model.layers.0.input_layernorm", "does not have"],
    "missing-B": ["model.layers.1.self_attn.v_proj", "no lora_B"],
    "rank-vs-config": ["rank 4", "r=6"],
    "nan": ["NaN"],
    "int-weights": ["dtype I32"],
    "embedding-lora": ["lora_embedding_A"],
    "dora": ["DoRA"],
    "bias": ["bias", "lora_only"],
    "lora-bias": ["lora_bias"],
    "modules-to-save": ["modules_to_save", "lm_head"],
    "pissa": ["pissa"],
    "not-lora": ["IA3"],
    "bad-json": ["adapter_config.json is not valid JSON"],
    "fingerprint": ["base model mismatch", "sha256:000"],
    "base-path": ["base model mismatch", "other-base"],
    "lineage-base": ["base model mismatch", "sha256:fff"],
    "reward-no-head": ["score_head.safetensors is missing"],
    "reward-wrong-hidden": ["[1, 32]", "hidden size is 64"],
    "unknown-kind": ["vision"],
}


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_by_name_and_leave_nothing(kind, store, tiny_base, adapter_dirs, tmp_path):
    store.register("bot", adapter_dirs["alpha"])
    d, kw = _bad(kind, tiny_base, adapter_dirs["alpha"], tmp_path)
    before = snapshot(store)
    with pytest.raises(InvalidAdapter) as e:
        store.register("bot", d, **kw)
    assert e.value.http_status == 422 and e.value.grpc_code == "FAILED_PRECONDITION"
    for frag in BAD_ADAPTERS[kind]:
        assert frag in str(e.value), (frag, str(e.value))
    assert snapshot(store) == before
    assert list((store.root / "tmp").iterdir()) == []
    assert store.register("bot", adapter_dirs["alpha"]).version == 2  # the failure consumed no version number


def test_wrong_shapes_for_the_base_name_module_and_both_shapes(store, tmp_path_factory):
    from helpers import make_peft_adapter, make_tiny_llama

    other = make_tiny_llama(tmp_path_factory.mktemp("other"), hidden_size=32, intermediate_size=64)
    wrong = make_peft_adapter(other, tmp_path_factory.mktemp("wrong") / "w", r=4, target_modules=["q_proj"])
    before = snapshot(store)
    with pytest.raises(InvalidAdapter) as e:
        store.register("wrong", wrong)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "in_features=32" in msg and "in_features=64" in msg, msg
    assert "lora_A [4, 32]" in msg and "expected lora_A [4, 64]" in msg, msg
    assert snapshot(store) == before


def test_rank_above_the_limit(tmp_path, spec, adapter_dirs):
    from dataclasses import replace

    st = AdapterStore(tmp_path / "s", base=replace(spec, max_rank=8))
    assert st.register("ok", adapter_dirs["beta"]).manifest.r == 8  # r == limit is fine
    before = snapshot(st)
    with pytest.raises(InvalidAdapter, match=r"rank 16, above the maximum LoRA rank 8"):
        st.register("big", adapter_dirs["gamma"])
    assert snapshot(st) == before


def test_real_dora_adapter_is_refused(store, tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(InvalidAdapter, match="DoRA"):
        store.register("dora", tmp_path / "dora")
    assert store.list() == []


def test_paths_outside_allowed_roots_are_forbidden(tmp_path, spec, adapter_dirs):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    good = copy_adapter(adapter_dirs["alpha"], allowed / "good")
    copy_adapter(adapter_dirs["alpha"], outside / "evil")
    st = AdapterStore(tmp_path / "store", base=spec, allowed_roots=[allowed])
    (allowed / "link").symlink_to(outside / "evil")  # a symlinked directory
    files_link = allowed / "files-link"  # a real directory whose weights are a symlink out
    files_link.mkdir()
    shutil.copy(good / "adapter_config.json", files_link)
    (files_link / "adapter_model.safetensors").symlink_to(outside / "evil" / "adapter_model.safetensors")
    (outside / "missing").mkdir()
    before = snapshot(st)
    for path in (outside / "evil", f"{allowed}/../outside/evil", allowed / "link", files_link, outside / "nope"):
        with pytest.raises(AdapterPathForbidden) as e:
            st.register("sneaky", path)
        assert e.value.http_status == 403 and e.value.grpc_code == "PERMISSION_DENIED"
        assert "outside the allowed adapter roots" in str(e.value), str(e.value)
    # the error names the path as given, never where it leads nor the allowed roots (server layout)
    msg = str(pytest.raises(AdapterPathForbidden, st.register, "s", allowed / "link").value)
    assert str(outside) not in msg and "resolves to" not in msg
    assert f"'{allowed}'" not in msg.replace(f"'{allowed}/link'", "")
    assert "adapter_model.safetensors" in str(pytest.raises(AdapterPathForbidden, st.register, "s", files_link).value)
    assert snapshot(st) == before
    v = st.register("fine", good)
    assert st.register("again", v.path).version == 1  # from inside the store: always allowed
    assert st.register("dotdot", f"{allowed}/sub/../good").version == 1
    with pytest.raises(InvalidAdapter, match="does not exist"):
        st.register("fine", allowed / "absent")


@pytest.mark.parametrize("name", ["", "a/b", "a@1", "-x", ".hidden", "x" * 65, "abc\n", "sp ace", "tiny-llama", "TINY-llama",
                                  "default", "..", "ü", None, 5])
def test_bad_names_are_invalid_requests(name, store, adapter_dirs):
    before = snapshot(store)
    with pytest.raises(InvalidRequest) as e:
        store.register(name, adapter_dirs["alpha"])
    assert e.value.http_status == 400 and e.value.grpc_code == "INVALID_ARGUMENT" and repr(name) in str(e.value)
    assert snapshot(store) == before


def test_good_unusual_names(store, adapter_dirs):
    for name in ("x" * 64, "A.b_c-1", "0", "v1.2.3"):
        assert store.register(name, adapter_dirs["alpha"]).ref == f"{name}@1"


def test_error_classes_carry_their_mapping():
    assert issubclass(InvalidAdapter, StoreError) and issubclass(AdapterConflict, StoreError)
    assert (AdapterNotFound.http_status, AdapterNotFound.grpc_code) == (404, "NOT_FOUND")
    assert (AdapterConflict.http_status, InvalidRequest.http_status) == (409, 400)


# --- crash safety ----------------------------------------------------------------------------------
def test_failure_after_the_copy_leaves_nothing(store, adapter_dirs, monkeypatch):
    import loraplex.adapters_store.versions as store_mod  # where registration lives

    store.register("bot", adapter_dirs["alpha"])
    before = snapshot(store)

    real_fsync = store_mod._fsync_dir

    def fail_after_rename(path):
        if path.name in ("bot", "fresh"):  # the parent directory, right after the version was renamed into it
            raise OSError("disk full")
        real_fsync(path)

    monkeypatch.setattr(store_mod, "_fsync_dir", fail_after_rename)
    with pytest.raises(OSError, match="disk full"):
        store.register("bot", adapter_dirs["beta"])
    with pytest.raises(OSError, match="disk full"):
        store.register("fresh", adapter_dirs["beta"])
    monkeypatch.undo()
    assert snapshot(store) == before

    # a crash after the insert but before commit: the row rolls back and the renamed directory goes
    real_event = AdapterStore._event

    def crash(self, c, kind, *a, **k):
        if kind == "registered":
            raise KeyboardInterrupt
        return real_event(self, c, kind, *a, **k)

    monkeypatch.setattr(AdapterStore, "_event", crash)
    with pytest.raises(KeyboardInterrupt):
        store.register("bot", adapter_dirs["beta"])
    monkeypatch.undo()
    assert snapshot(store) == before


def test_a_directory_left_by_a_crash_is_never_reused(store, adapter_dirs):
    store.register("bot", adapter_dirs["alpha"])
    stray = store.root / "adapters" / "bot" / "2"  # renamed into place, then the process died before commit
    shutil.copytree(adapter_dirs["beta"], stray)
    (store.root / "tmp" / "bot.123.dead").mkdir()
    old = time.time() - 7200
    os.utime(store.root / "tmp" / "bot.123.dead", (old, old))
    v = store.register("bot", adapter_dirs["delta"])
    assert v.version == 3 and v.manifest.r == 2 and stray.exists()
    AdapterStore(store.root)  # opening the store sweeps old temporaries
    assert list((store.root / "tmp").iterdir()) == []


# --- concurrency -----------------------------------------------------------------------------------
def test_concurrent_registration_from_threads(store, adapter_dirs):
    out, errors = [], []

    def work(i):
        try:
            for _ in range(3):
                out.append(store.register("busy", adapter_dirs["alpha" if i % 2 else "delta"], caller=f"t{i}").version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert sorted(out) == list(range(1, 19))
    assert [v.version for v in store.versions("busy")] == list(range(1, 19))
    assert sorted(int(p.name) for p in (store.root / "adapters" / "busy").iterdir()) == list(range(1, 19))


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from loraplex.adapters_store import AdapterStore
    root, src, go, n, who = sys.argv[1:]
    st = AdapterStore(root)
    while not Path(go).exists():
        time.sleep(0.005)
    print(json.dumps([st.register("shared", src, caller=who).version for _ in range(int(n))]))
""")


def test_concurrent_registration_from_two_processes(store, adapter_dirs, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(store.root), str(adapter_dirs["alpha"]), str(go), "4", f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]
    time.sleep(0.5)
    go.touch()
    mine = [store.register("shared", adapter_dirs["delta"], caller="main").version for _ in range(4)]
    got = list(mine)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got += json.loads(out.strip().splitlines()[-1])
    assert sorted(got) == list(range(1, 13))
    vs = store.versions("shared")
    assert [v.version for v in vs] == list(range(1, 13))
    assert Counter(e.caller for e in store.events_since(0) if e.kind == "registered") == {"main": 4, "p0": 4, "p1": 4}
    assert all((v.path / "adapter_model.safetensors").is_file() for v in vs)


def test_changes_made_elsewhere_are_seen_and_logged(store, adapter_dirs):
    other = AdapterStore(store.root)  # another process's view of the same store
    seq = store.last_event_seq()
    v = other.register("bot", adapter_dirs["alpha"], caller="trainer")
    assert store.get("bot") == v  # no restart, no manual refresh
    other.register("bot", adapter_dirs["beta"], caller="trainer")
    other.set_route("bot", {1: 90, 2: 10}, caller="trainer")
    assert store.get_route("bot").versions == {1: 90, 2: 10}
    evs = store.events_since(seq)
    assert [(e.kind, e.version, e.caller) for e in evs] == [("registered", 1, "trainer"), ("registered", 2, "trainer"),
                                                          ("route_changed", None, "trainer")]
    assert evs[-1].detail["versions"] == {"1": 90, "2": 10} and evs[0].detail["sha256"] == v.sha256
    assert store.events_since(evs[-1].seq) == []
    other.close()


# --- routes ----------------------------------------------------------------------------------------
@pytest.fixture
def three(store, adapter_dirs):
    for src in ("alpha", "beta", "gamma"):
        store.register("bot", adapter_dirs[src])
    return store


@pytest.mark.parametrize("weights, frag", [
    ({1: 50, 2: 40}, "sum to 100, got 90"),
    ({1: 60, 2: 50}, "sum to 100, got 110"),
    ({1: 110, 2: -10}, "0..100"),
    ({1: 50.0, 2: 50}, "integer percentage"),
    ({1: True, 2: 99}, "integer percentage"),
    ({"x": 100}, "'x' is not an integer"),
    ({"1.5": 100}, "not an integer"),
    ({0: 100}, "positive"),
    ({1: 50, 9: 50}, "version(s) [9] that do not exist"),
    ({}, "non-empty"),
    ("all", "non-empty mapping"),
])
def test_bad_routes_are_refused_and_change_nothing(weights, frag, three):
    three.set_route("bot", {1: 100}, caller="setup")
    before = snapshot(three), three.route_history("bot")
    with pytest.raises(InvalidRequest) as e:
        three.set_route("bot", weights)
    assert frag in str(e.value) and e.value.http_status == 400
    with pytest.raises(InvalidRequest):
        three.validate_route("bot", weights)
    assert (snapshot(three), three.route_history("bot")) == before


def test_route_refusals_for_unknown_adapters_sticky_and_rollback(three):
    before = snapshot(three)
    with pytest.raises(AdapterNotFound):
        three.set_route("nobody", {1: 100})
    with pytest.raises(InvalidRequest, match="sticky"):
        three.set_route("bot", {1: 100}, sticky="planet")
    with pytest.raises(InvalidRequest, match="no earlier state"):
        three.rollback("bot")
    with pytest.raises(AdapterNotFound):
        three.rollback("nobody")
    with pytest.raises(InvalidRequest, match=r"\[9\]"):
        three.promote("bot", 9)
    assert snapshot(three) == before and three.get_route("bot") is None and three.route_history("bot") == []
    three.promote("bot", 1)  # first route: from "latest" to a route; nothing earlier to roll back to
    with pytest.raises(InvalidRequest, match="no earlier state"):
        three.rollback("bot")


def test_promote_rollback_and_history(three):
    t0 = time.time()
    r = three.set_route("bot", {"1": 90, "2": 10}, sticky="user", guard={"max_error_rate": 0.2}, caller="alice")
    guard = {"max_error_rate": 0.2, "min_requests": 20}  # stored typed, with its default filled in
    assert (r.versions, r.sticky, r.guard, r.updated_by) == ({1: 90, 2: 10}, "user", guard, "alice")
    assert three.get_route("bot") == r
    p = three.promote("bot", 2, caller="bob")
    assert (p.versions, p.sticky, p.guard) == ({2: 100}, "user", None)
    with pytest.raises(AdapterConflict, match="100%"):
        three.delete("bot", 2)
    back = three.rollback("bot", caller="guard", reason="error rate 40% > 20%")
    assert (back.versions, back.sticky, back.guard, back.updated_by) == ({1: 90, 2: 10}, "user", guard, "guard")
    assert three.rollback("bot", caller="carol").versions == {2: 100}  # rolling back a rollback swaps back
    h = three.route_history("bot")
    assert [(c.action, c.caller) for c in h] == [("set", "alice"), ("promote", "bob"), ("rollback", "guard"), ("rollback", "carol")]
    assert h[0].old is None and h[0].new["versions"] == {"1": 90, "2": 10}
    assert h[1].old["versions"] == {"1": 90, "2": 10} and h[1].new["versions"] == {"2": 100}
    assert h[2].reason == "error rate 40% > 20%" and h[2].new["versions"] == {"1": 90, "2": 10}
    assert t0 <= h[0].at <= h[1].at <= h[2].at <= h[3].at <= time.time()
    with pytest.raises(AdapterConflict, match="still receives"):
        three.delete("bot", 2)
    assert three.delete("bot", 1)[0].ref == "bot@1"  # no traffic now


def test_deleting_a_zero_percent_version_prunes_it_from_the_route(three):
    three.set_route("bot", {1: 100, 2: 0, 3: 0})
    three.delete("bot", 2, caller="ops")
    assert three.get_route("bot").versions == {1: 100, 3: 0}
    assert three.route_history("bot")[-1].action == "prune"
    three.promote("bot", 3)
    assert three.rollback("bot").versions == {1: 100, 3: 0}  # the earlier route, less the deleted version


def test_deleting_the_whole_adapter_removes_its_route(three, adapter_dirs):
    three.set_route("bot", {1: 50, 2: 50})
    assert len(three.delete("bot")) == 3
    assert three.get_route("bot") is None and three.route_history("bot")[-1].action == "delete"
    three.register("bot", adapter_dirs["alpha"])
    with pytest.raises(InvalidRequest, match="no earlier state"):  # the old adapter's routes are not resurrected
        three.rollback("bot")
    assert three.resolve("bot").version == 4


def test_resolve_explicit_latest_and_canary_split(three):
    assert three.resolve("bot").version == 3  # no route: latest
    assert three.resolve("bot", 1).version == 1 and three.resolve("bot", 1, sticky_key="u").version == 1
    with pytest.raises(AdapterNotFound):
        three.resolve("bot", 8)
    with pytest.raises(AdapterNotFound):
        three.resolve("nobody")
    three.set_route("bot", {1: 90, 2: 10})
    t = time.perf_counter()
    hits = Counter(three.resolve("bot").version for _ in range(2000))
    elapsed = time.perf_counter() - t
    assert set(hits) == {1, 2}
    assert abs(hits[2] - 200) < 60, hits  # binomial sd ~13.4: 60 is > 4 sd
    assert elapsed < 0.5, f"2000 resolves took {elapsed:.3f}s"


def test_sticky_keys_keep_their_version(three):
    three.set_route("bot", {1: 50, 2: 50}, sticky="user")
    keys = [f"user-{i}" for i in range(300)]
    first = {k: three.resolve("bot", sticky_key=k).version for k in keys}
    assert all(three.resolve("bot", sticky_key=k).version == first[k] for k in keys for _ in range(3))
    assert 100 < Counter(first.values())[2] < 200
    other = AdapterStore(three.root)  # another process agrees
    assert {k: other.resolve("bot", sticky_key=k).version for k in keys} == first
    # growing the canary moves keys onto it, never off it
    three.set_route("bot", {1: 20, 2: 80}, sticky="user")
    now = {k: three.resolve("bot", sticky_key=k).version for k in keys}
    assert all(now[k] == 2 for k in keys if first[k] == 2)
    assert 200 < Counter(now.values())[2] < 280
    other.close()


def test_readers_see_the_old_or_the_new_route_never_a_mix(three):
    a = ({1: 70, 2: 30}, "user", {"max_error_rate": 0.5, "min_requests": 7})
    b = ({2: 10, 3: 90}, None, None)
    three.set_route("bot", a[0], sticky=a[1], guard=a[2])
    other = AdapterStore(three.root)
    stop, seen, bad = threading.Event(), Counter(), []

    def read(st):
        while not stop.is_set():
            r = st.get_route("bot")
            got = (r.versions, r.sticky, r.guard)
            seen[str(got)] += 1
            if got not in (a, b):
                bad.append(got)
            st.resolve("bot", sticky_key="k")

    ts = [threading.Thread(target=read, args=(s,)) for s in (three, other)]
    for t in ts:
        t.start()
    for i in range(40):
        cur = b if i % 2 == 0 else a
        three.set_route("bot", cur[0], sticky=cur[1], guard=cur[2])
    stop.set()
    for t in ts:
        t.join()
    assert bad == [] and len(seen) == 2
    other.close()


def test_restart_keeps_versions_routes_history_and_counters(tmp_path, spec, adapter_dirs):
    root = tmp_path / "store"
    st = AdapterStore(root, base=spec)
    for src in ("alpha", "beta", "gamma"):
        st.register("bot", adapter_dirs[src], lineage={"src": src})
    st.delete("bot", 3)
    st.set_route("bot", {1: 80, 2: 20}, sticky="session", caller="alice")
    st.promote("bot", 2, caller="bob")
    before = (st.list(), st.get_route("bot"), st.route_history("bot"), st.events_since(0))
    st.close()
    del st
    st2 = AdapterStore(root, base=spec)
    assert (st2.list(), st2.get_route("bot"), st2.route_history("bot"), st2.events_since(0)) == before
    assert st2.rollback("bot").versions == {1: 80, 2: 20}
    assert st2.register("bot", adapter_dirs["alpha"]).version == 4
    assert st2.get("bot", 1).lineage == {"src": "alpha"}
    assert load_adapter_weights(st2.get("bot", 2).path, st2.get("bot", 2).manifest).keys() == st2.get("bot", 2).manifest.module_ranks.keys()


def test_versions_registered_for_another_base_are_not_served(tmp_path, spec, adapter_dirs):
    from dataclasses import replace

    st = AdapterStore(tmp_path / "store", base=spec)
    st.register("bot", adapter_dirs["alpha"])
    moved = AdapterStore(tmp_path / "store", base=replace(spec, fingerprint="sha256:" + "1" * 32))
    assert moved.get("bot").version == 1  # still listed
    with pytest.raises(InvalidAdapter, match="registered for base fingerprint"):
        moved.resolve("bot")


def test_connections_of_finished_threads_are_closed(store, adapter_dirs):
    import gc

    store.register("bot", adapter_dirs["alpha"])

    def open_fds() -> int:
        gc.collect()
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(store.db_path)))

    before = open_fds()
    for _ in range(30):
        t = threading.Thread(target=lambda: store.resolve("bot"))
        t.start()
        t.join()
    assert open_fds() <= before + 3  # one connection's db/wal handles at most, not 30 threads' worth
    store.close()
    assert open_fds() == 0


def test_crash_leftovers_are_swept_at_open_but_never_a_live_registration(tmp_path, spec):
    AdapterStore(tmp_path / "s", base=spec).close()
    tmp = tmp_path / "s" / "tmp"
    (tmp / "bot.99999.crashed").mkdir()  # fresh, no lock file: a registration that died
    (tmp / "bot.99999.crashed" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp / "bot.1.unlocked").mkdir()
    (tmp / "bot.1.unlocked.lock").touch()  # a lock file nobody holds: its owner died
    (tmp / "bot.3.orphan.lock").touch()
    live = tmp / "bot.2.live"
    live.mkdir()
    holder = subprocess.Popen(  # another process mid-registration holds its entry's lock
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(tmp / "bot.2.live.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        AdapterStore(tmp_path / "s", base=spec).close()
        assert sorted(p.name for p in tmp.iterdir()) == ["bot.2.live", "bot.2.live.lock"]
    finally:
        holder.kill()
        holder.wait()
    AdapterStore(tmp_path / "s", base=spec).close()  # its owner is gone now
    assert list(tmp.iterdir()) == []


def test_a_registration_holds_its_tmp_entry_against_a_sweeping_open(store, adapter_dirs, monkeypatch):
    """A store opened (and sweeping tmp/) while another registration copies never removes that copy."""
    real_copy = store._copy_files
    swept = []

    def copy_then_sweep(plan, dst, shown):
        real_copy(plan, dst, shown)
        other = AdapterStore(store.root)  # opens and sweeps, as a second process starting would
        swept.append(dst.exists())
        other.close()

    monkeypatch.setattr(store, "_copy_files", copy_then_sweep)
    v = store.register("bot", adapter_dirs["alpha"])
    assert swept == [True] and v.version == 1 and list((store.root / "tmp").iterdir()) == []
