"""A corpus of hostile adapter directories, registered over HTTP against a running server.

Every case must get a 4xx in OpenAI's error shape, quickly, and leave the server as it was: the
engine still answers (with the adapters it served before, unchanged), the store holds the same
versions and files, and nothing is left in its tmp/. The cases are kinds of attack, not payloads:
a regex that backtracks, numbers that are not finite (or stop being finite in the serving dtype),
numbers of the wrong kind, files that are too large, too deep or not files, paths that are not paths.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

MAX_ADAPTER_BYTES = 1 << 20
PROMPT = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, adapter_dirs) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(adapter_dirs["alpha"], root / "good")
    return root


@pytest.fixture(scope="module")
def hsrv(tiny_base, tmp_path_factory, hostile_root, adapter_dirs):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("hostile-srv"), tiny_base, max_loras=2,
                     allowed_adapter_roots=[hostile_root], max_adapter_bytes=MAX_ADAPTER_BYTES)
    for name, src in (("resident", "alpha"), ("other", "delta")):
        shutil.copytree(adapter_dirs[src], hostile_root / f"src-{name}")
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": name, "path": str(hostile_root / f"src-{name}")})
        assert r.status_code == 201, r.text
    yield s
    s.stop()


def completion(srv, model: str) -> list:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": model, **PROMPT, "logprobs": 1}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def store_state(srv):
    st = srv.state.store
    files = sorted(str(p.relative_to(st.root)) for p in (st.root / "adapters").rglob("*"))
    return [v.ref for v in st.list()], files, sorted(p.name for p in (st.root / "tmp").iterdir())


def assert_openai_error(r: httpx.Response, lo: int = 400, hi: int = 499) -> dict:
    assert lo <= r.status_code <= hi, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def raw_config(d: Path, text: str) -> None:
    (d / "adapter_config.json").write_text(text)


def config_text(d: Path, key: str, literal: str) -> None:
    """Sets `key` to a raw JSON literal (NaN, Infinity, 1e999, a 5000-digit integer...)."""
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[key] = "@@"
    raw_config(d, json.dumps(cfg).replace('"@@"', literal))


def f64_overflow(d: Path) -> None:
    w = load_file(str(d / "adapter_model.safetensors"))
    k = next(k for k in w if "lora_B" in k)
    w = {n: t.double() for n, t in w.items()}
    w[k][0, 0] = 1e39  # finite in float64, infinite in the server's float32
    save_file(w, str(d / "adapter_model.safetensors"))


def weights_too_large(d: Path) -> None:
    (d / "README.md").write_bytes(b"#" * (MAX_ADAPTER_BYTES + 1))


def deep_config(d: Path) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    text = json.dumps(cfg)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    raw_config(d, text)


def weights_are_a_fifo(d: Path) -> None:
    os.remove(d / "adapter_model.safetensors")
    os.mkfifo(d / "adapter_model.safetensors")


CASES = {
    # regular expressions PEFT would backtrack on, or that are not regular expressions at all
    "rank-pattern-catastrophic": lambda d: edit_config(d, rank_pattern={"(.*.*)*Z": 8}),
    "alpha-pattern-catastrophic": lambda d: edit_config(d, alpha_pattern={"(a|aa)*q_proj": 8}),
    "pattern-many-repeats": lambda d: edit_config(d, rank_pattern={".*a.*b.*c.*d.*Z": 4}),
    "pattern-invalid-regex": lambda d: edit_config(d, rank_pattern={"q_proj[": 4}),
    "pattern-backreference": lambda d: edit_config(d, alpha_pattern={r"(q)\1_proj": 4}),
    "pattern-lookahead": lambda d: edit_config(d, alpha_pattern={"(?=q)q_proj": 4}),
    "pattern-huge-key": lambda d: edit_config(d, rank_pattern={"q" * 10_000: 4}),
    "pattern-not-an-object": lambda d: edit_config(d, rank_pattern=["q_proj", 4]),
    # target_modules that PEFT would read otherwise than the weights say
    "targets-leave-out-a-tensor": lambda d: edit_config(d, target_modules=["q_proj"]),  # v_proj's weights: ignored by PEFT
    "targets-name-a-module-the-base-lacks": lambda d: edit_config(d, target_modules=["q_proj", "v_proj", "w_magic"]),
    "targets-regex-misses-tensors": lambda d: edit_config(d, target_modules=r".*\.q_proj"),
    "targets-regex-catastrophic": lambda d: edit_config(d, target_modules="(.*.*)*Z"),
    "targets-not-names": lambda d: edit_config(d, target_modules=[1, 2]),
    # pattern values of the wrong kind
    "rank-pattern-float": lambda d: edit_config(d, rank_pattern={"q_proj": 4.9}),
    "rank-pattern-string": lambda d: edit_config(d, rank_pattern={"q_proj": "4"}),
    "rank-pattern-bool": lambda d: edit_config(d, rank_pattern={"q_proj": True}),
    "rank-pattern-negative": lambda d: edit_config(d, rank_pattern={"q_proj": -4}),
    "alpha-pattern-nan": lambda d: config_text(d, "alpha_pattern", '{"q_proj": NaN}'),
    "alpha-pattern-string": lambda d: edit_config(d, alpha_pattern={"q_proj": "big"}),
    # numbers that are not finite, or not finite in the serving dtype
    "alpha-nan": lambda d: config_text(d, "lora_alpha", "NaN"),
    "alpha-infinity": lambda d: config_text(d, "lora_alpha", "Infinity"),
    "alpha-minus-infinity": lambda d: config_text(d, "lora_alpha", "-Infinity"),
    "alpha-overflows-float": lambda d: config_text(d, "lora_alpha", "1e999"),
    "alpha-overflows-fp32": lambda d: edit_config(d, lora_alpha=1e308),
    "alpha-huge-integer": lambda d: config_text(d, "lora_alpha", "9" * 5000),
    "weights-overflow-fp32": f64_overflow,
    # ranks and flags of the wrong kind
    "r-infinity": lambda d: config_text(d, "r", "Infinity"),
    "r-fractional": lambda d: edit_config(d, r=4.9),
    "r-string": lambda d: edit_config(d, r="4"),
    "r-bool": lambda d: edit_config(d, r=True),
    "r-zero": lambda d: edit_config(d, r=0),
    "rslora-string": lambda d: edit_config(d, use_rslora="false"),
    "kind-not-a-string": lambda d: edit_config(d, loraplex_kind=["reward"]),
    "base-name-not-a-string": lambda d: edit_config(d, base_model_name_or_path={"x": 1}),
    "base-name-nul": lambda d: edit_config(d, base_model_name_or_path="/a\u0000b"),
    # files that are too large, too deep, not JSON or not files
    "config-not-utf8": lambda d: (d / "adapter_config.json").write_bytes(b'{"r": 4, "x": "\xff\xfe"}'),
    "config-too-large": lambda d: raw_config(d, json.dumps({**json.loads((d / "adapter_config.json").read_text()),
                                                             "pad": "x" * (2 << 20)})),
    "config-too-deep": deep_config,
    "config-a-list": lambda d: raw_config(d, "[1, 2]"),
    "adapter-over-size-cap": weights_too_large,
    "weights-a-fifo": weights_are_a_fifo,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_adapter_is_4xx_and_changes_nothing(case, hsrv, hostile_root):
    d = hostile_root / f"case-{case}"
    shutil.copytree(hostile_root / "good", d)
    CASES[case](d)
    before_tokens = completion(hsrv, "resident")
    before = store_state(hsrv)
    t0 = time.monotonic()
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "hostile", "path": str(d)}, timeout=30)
    took = time.monotonic() - t0
    err = assert_openai_error(r)
    assert took < 10, f"{case}: answered in {took:.1f}s"
    assert str(hsrv.state.store.root) not in err["message"]  # the store's own layout is never shown
    assert store_state(hsrv) == before
    assert completion(hsrv, "resident") == before_tokens  # the engine lives, its adapters unchanged
    assert httpx.get(f"{hsrv.url}/v1/adapters").status_code == 200
    assert httpx.get(f"{hsrv.url}/health").status_code == 200


@pytest.mark.parametrize("case, key", [("rank-pattern-catastrophic", "(.*.*)*Z"), ("pattern-invalid-regex", "q_proj["),
                                       ("rank-pattern-float", "q_proj"), ("alpha-pattern-string", "q_proj")])
def test_pattern_errors_name_the_key(case, key, hsrv, hostile_root):
    d = hostile_root / f"named-{case}"
    shutil.copytree(hostile_root / "good", d)
    CASES[case](d)
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "hostile", "path": str(d)}, timeout=30)
    assert r.status_code == 422 and repr(key) in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path, status", [("/tmp/a\u0000b", 400), ("/" + "a" * 10_000, 400), ("/" + "b/" * 3000, 400),
                                          ("\u0007bell", 400)])
def test_paths_that_are_not_paths_are_4xx(path, status, hsrv):
    before = store_state(hsrv)
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "hostile", "path": path})
    assert r.status_code == status and assert_openai_error(r)["message"]
    assert len(r.text) < 2000  # a 10k-character path is not echoed back whole
    assert store_state(hsrv) == before


def test_a_symlink_out_names_no_server_path(hsrv, hostile_root, tmp_path):
    outside = tmp_path / "secret-place"
    shutil.copytree(hostile_root / "good", outside)
    (hostile_root / "link-out").symlink_to(outside)
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "hostile", "path": str(hostile_root / "link-out")})
    err = assert_openai_error(r)
    assert r.status_code == 403 and "secret-place" not in r.text and str(hostile_root) + "'" not in err["message"]


def test_only_the_adapters_own_files_are_copied(hsrv, hostile_root):
    d = hostile_root / "junk-beside"
    shutil.copytree(hostile_root / "good", d)
    for i in range(300):
        (d / f"junk-{i}.txt").write_text("x")
    (d / "huge.dat").write_bytes(b"\0" * (3 * MAX_ADAPTER_BYTES))  # over the cap, but not the adapter's
    (d / "checkpoint-1").mkdir()
    (d / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"x")
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "junk-beside", "path": str(d)})
    assert r.status_code == 201, r.text
    v = hsrv.state.store.get("junk-beside")
    assert sorted(p.name for p in v.path.iterdir()) == sorted(p.name for p in (hostile_root / "good").iterdir())
    assert completion(hsrv, "junk-beside")
    assert httpx.delete(f"{hsrv.url}/v1/adapters/junk-beside").status_code == 200


def test_non_finite_lineage_is_refused_and_listing_never_500s(hsrv, hostile_root):
    before = store_state(hsrv)
    body = '{"name": "nan-lineage", "path": "%s", "lineage": {"loss": NaN}}' % (hostile_root / "good")
    r = httpx.post(f"{hsrv.url}/v1/adapters", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and assert_openai_error(r)["param"] in ("lineage", None), r.text
    assert store_state(hsrv) == before
    assert httpx.get(f"{hsrv.url}/v1/adapters").status_code == 200


def test_a_stored_non_finite_record_is_hidden_not_500(hsrv, hostile_root):
    """A row an older release stored with a NaN scale: reads skip it (never 500), delete still removes it."""
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "legacy", "path": str(hostile_root / "good")})
    assert r.status_code == 201
    st = hsrv.state.store
    with st._write() as c:
        m = json.loads(c.execute("SELECT manifest FROM versions WHERE name = 'legacy'").fetchone()[0])
        m["module_scales"] = {k: float("nan") for k in m["module_scales"]}
        c.execute("UPDATE versions SET manifest = ? WHERE name = 'legacy'", (json.dumps(m),))
        st._event(c, "registered", "legacy", 1, "test")
    assert httpx.get(f"{hsrv.url}/v1/adapters").status_code == 200
    assert httpx.get(f"{hsrv.url}/v1/models").status_code == 200
    assert "legacy@1" not in [v.ref for v in st.list()]
    assert httpx.post(f"{hsrv.url}/v1/completions", json={"model": "legacy", **PROMPT}).status_code == 404
    assert httpx.delete(f"{hsrv.url}/v1/adapters/legacy").status_code == 200
    assert not (st.root / "adapters" / "legacy").exists()


@pytest.mark.parametrize("ref", ["resident@²", "resident@١", "resident@1.0", "resident@+1", "resident@ 1",
                                 "resident@0", "resident@99999999999"])
def test_versions_in_model_refs_are_ascii_integers(ref, hsrv):
    r = httpx.post(f"{hsrv.url}/v1/completions", json={"model": ref, **PROMPT})
    assert r.status_code in (400, 404), r.text
    assert_openai_error(r)


@pytest.mark.parametrize("ver", ["١", "²", "1.0", "+1", " 1", "0", "-1", "1e0", "99999999999"])
def test_delete_versions_are_ascii_integers_and_delete_nothing_else(ver, hsrv):
    before = store_state(hsrv)
    r = httpx.delete(f"{hsrv.url}/v1/adapters/resident", params={"version": ver})
    assert r.status_code in (400, 404), r.text
    assert_openai_error(r)
    assert store_state(hsrv) == before


def test_no_server_paths_in_models_adapters_and_lineage(hsrv, hostile_root):
    lineage = {"dataset": "/srv/secret/data/train.jsonl", "config": {"output_dir": "/home/op/runs/x"},
               "note": "from /opt/ckpt/base (see https://example.org/a/b)"}
    body = {"name": "pathless", "path": str(hostile_root / "good"), "lineage": lineage}
    r = httpx.post(f"{hsrv.url}/v1/adapters", json=body)
    assert r.status_code == 201, r.text
    root = str(hsrv.state.store.root)
    base = str(hsrv.state.service.base.path)
    for body in (r.text, httpx.get(f"{hsrv.url}/v1/adapters").text, httpx.get(f"{hsrv.url}/v1/adapters/pathless").text,
                 httpx.get(f"{hsrv.url}/v1/models").text):
        for secret in (root, base, str(hostile_root), "/srv/secret", "/home/op", "/opt/ckpt"):
            assert secret not in body, (secret, body[:300])
    shown = r.json()["lineage"]
    assert shown["dataset"] == "train.jsonl" and shown["config"]["output_dir"] == "x"
    assert "https://example.org/a/b" in shown["note"]
    assert hsrv.state.store.get("pathless").lineage == lineage  # the operator's audit trail keeps them
    assert httpx.delete(f"{hsrv.url}/v1/adapters/pathless").status_code == 200


def test_a_refused_slot_fill_fails_its_request_alone_and_keeps_the_slot(hsrv):
    """An adapter that reaches the engine but cannot fill a slot (a 1e308 scale that overflows fp32):
    its request fails at once, the slot it would have taken still serves its adapter unchanged, the
    pin is released (a delete would not drain forever), and other requests go on."""
    from types import SimpleNamespace

    from loraplex.server.engine.adapter_pool import LoadedAdapter
    from loraplex.server.engine.request import SamplingParams

    eng, svc = hsrv.engine, hsrv.state.service
    want_resident, want_other = completion(hsrv, "resident"), completion(hsrv, "other")  # both slots full now
    assert {eng.pool.slot_of("resident@1"), eng.pool.slot_of("other@1")} == {0, 1}
    mod = next(iter(eng.pool.modules))
    lin = eng.pool.modules[mod]
    weights = {mod: (torch.ones(4, lin.in_features), torch.ones(lin.out_features, 4))}
    bad = LoadedAdapter("poison@1", weights, {mod: 1e308}, 0.0)
    with eng.pool._lock:  # straight into the CPU tier, as if an older check had let it through
        eng.pool._cpu["poison@1"] = bad
    version = SimpleNamespace(ref="poison@1", name="poison", version=1)
    ids = svc.text_prompt_ids("hello")
    req = svc.submit(ids, SamplingParams(max_tokens=2, temperature=0), version)
    out = req.stream.get(timeout=30)
    while not out.finished:
        out = req.stream.get(timeout=30)
    assert out.finish_reason == "error" and "poison@1" in (out.error or "")
    assert eng.pool.pinned("poison@1") == 0
    assert eng.pool.slot_of("poison@1") is None
    assert completion(hsrv, "resident") == want_resident and completion(hsrv, "other") == want_other
    with eng.pool._lock:
        eng.pool._cpu.pop("poison@1", None)


def test_route_guards_are_typed_and_bounded(hsrv):
    u = hsrv.url
    before = httpx.get(f"{u}/v1/routes").json()
    for guard in ({"max_error_rate": 0.1, "min_requests": 2**40}, {"max_error_rate": 0.1, "min_requests": 0},
                  {"max_error_rate": 2}, {"max_error_rate": "0.1"}, {"max_error_rate": 0.1, "extra": 1},
                  {"min_requests": 5}, [0.1]):
        r = httpx.put(f"{u}/v1/routes/resident", json={"versions": {"1": 100}, "guard": guard})
        assert r.status_code == 400, (guard, r.text)
        assert_openai_error(r)
    r = httpx.put(f"{u}/v1/routes/resident", content='{"versions": {"1": 100}, "guard": {"max_error_rate": NaN}}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert httpx.get(f"{u}/v1/routes").json() == before
    with pytest.raises(Exception, match="min_requests"):
        hsrv.state.store.set_route("resident", {1: 100}, guard={"max_error_rate": 0.5, "min_requests": 2**33})


@pytest.mark.parametrize("window", ["nan", "NaN", "inf", "-inf", "-5", "0", "1e300", "abc", "1" * 100])
def test_compare_window_must_be_a_bounded_positive_number(window, hsrv):
    r = httpx.get(f"{hsrv.url}/v1/routes/resident/compare", params={"window": window})
    assert r.status_code == 400 and assert_openai_error(r)["param"] == "window", r.text


def test_route_versions_are_ascii_integers(hsrv):
    for versions in ({"١": 100}, {"²": 100}, {"1_0": 100}, {" 1": 100}, {"+1": 100}):
        r = httpx.put(f"{hsrv.url}/v1/routes/resident", json={"versions": versions})
        assert r.status_code == 400, (versions, r.text)


def test_route_changes_never_queue_behind_slow_registrations(hsrv, hostile_root, monkeypatch):
    """Registrations run on their own bounded executor: while a dozen copy slowly (a slow disk), route changes,
    health and completions answer at once, and registrations past the bound get 429."""
    import threading

    from loraplex.server.api.adapters_api import REGISTER_PENDING, REGISTER_WORKERS

    st = hsrv.state.store
    real_copy = st._copy_files
    release = threading.Event()

    def slow_copy(plan, dst, shown):
        release.wait(20)
        real_copy(plan, dst, shown)

    monkeypatch.setattr(st, "_copy_files", slow_copy)
    n = REGISTER_WORKERS + REGISTER_PENDING + 3
    codes: list[int] = []

    def register():
        body = {"name": "slow", "path": str(hostile_root / "good")}
        r = httpx.post(f"{hsrv.url}/v1/adapters", json=body, timeout=60)
        codes.append(r.status_code)

    ts = [threading.Thread(target=register) for _ in range(n)]
    for t in ts:
        t.start()
    try:
        deadline = time.time() + 10
        while len(codes) < 3 and time.time() < deadline:  # the ones past the bound are answered at once
            time.sleep(0.05)
        t0 = time.monotonic()
        r = httpx.put(f"{hsrv.url}/v1/routes/resident", json={"versions": {"1": 100}}, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{hsrv.url}/health", timeout=30).status_code == 200
        assert completion(hsrv, "resident")
        assert time.monotonic() - t0 < 5
        assert sorted(codes) == [429] * 3
    finally:
        release.set()
        for t in ts:
            t.join(60)
    assert sorted(codes) == [201] * (n - 3) + [429] * 3
    assert httpx.delete(f"{hsrv.url}/v1/adapters/slow").status_code == 200
    assert store_state(hsrv)[2] == []


def test_set_slot_is_all_or_nothing():
    from loraplex.server.engine.lora_layer import LoraContext, LoraLinear

    lin = LoraLinear(torch.nn.Linear(8, 6), LoraContext(), num_slots=2)
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    lin.set_slot(1, a, b, 2.0)
    before = (lin.A.clone(), lin.Bt.clone(), lin.scales.clone(), lin.ranks.clone(), list(lin.ranks_host))
    for bad in [(torch.randn(16, 8), torch.randn(6, 16), 1e308), (torch.full((16, 8), 1e39, dtype=torch.float64),
                torch.randn(6, 16), 1.0), (torch.randn(4, 8), torch.randn(6, 4), float("nan")),
                (torch.randn(4, 7), torch.randn(6, 4), 1.0)]:
        with pytest.raises(ValueError):
            lin.set_slot(1, *bad)
        after = (lin.A, lin.Bt, lin.scales, lin.ranks, lin.ranks_host)
        assert all(torch.equal(x, y) for x, y in zip(before[:4], after[:4])) and before[4] == after[4]


def test_a_guard_at_its_bounds_encodes_for_grpc(hsrv):
    from loraplex.server.api.grpc_server import _route_msg

    r = httpx.put(f"{hsrv.url}/v1/routes/resident", json={"versions": {"1": 100},
                                                           "guard": {"max_error_rate": 1, "min_requests": 1_000_000}})
    assert r.status_code == 200, r.text
    msg = _route_msg(hsrv.state.store.get_route("resident"))
    assert msg.guard.min_requests == 1_000_000 and msg.guard.max_error_rate == 1.0
    assert httpx.post(f"{hsrv.url}/v1/routes/resident/promote", json={"version": 1}).status_code == 200


@pytest.mark.parametrize("targets", [r".*\.(q_proj|v_proj)", "all-linear", ["v_proj", "q_proj", "k_proj"]])
def test_target_modules_that_cover_the_weights_are_accepted(targets, hsrv, hostile_root):
    """A regex, PEFT's all-linear, and a list naming one module more than the weights (PEFT starts it at zero)."""
    d = hostile_root / f"targets-ok-{abs(hash(str(targets)))}"
    shutil.copytree(hostile_root / "good", d)
    edit_config(d, target_modules=targets)
    r = httpx.post(f"{hsrv.url}/v1/adapters", json={"name": "targets-ok", "path": str(d)}, timeout=30)
    assert r.status_code == 201, r.text
