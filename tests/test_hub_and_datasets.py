"""Hub ids (models, adapters, datasets) resolved offline from a hub cache laid out in a fixture, and datasets beyond
one JSONL file (JSON, CSV, Parquet, hub datasets) with Axolotl-style field mapping."""

from __future__ import annotations

import json

import pytest

from loraplex.trainer.config import JobConfigError, parse_config
from loraplex.trainer.data import DataError


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline hub cache: HF_HOME / HF_HUB_CACHE point at it (for subprocesses) and huggingface_hub, which reads
    them at import, is pointed at it too; HF_HUB_OFFLINE=1 keeps every lookup to the cache."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def job(base, datasets, **kw):
    d = {
        "base_model": str(base),
        "adapter": {"name": "hubbed", "r": 4, "alpha": 8},
        "datasets": datasets,
        "sequence_len": 128,
        "learning_rate": 1e-3,
        "save_steps": 1000,
        "gradient_checkpointing": False,
    }
    d.update(kw)
    return parse_config(d)


def examples(cfg):
    from loraplex.trainer.core import load_tokenizer
    from loraplex.trainer.sft import prepare_data

    tok = load_tokenizer(cfg)
    train, _, info = prepare_data(cfg, tok)
    return tok, train, info


def trained_text(tok, ex):
    return tok.decode([t for t, l in zip(ex.input_ids[1:], ex.labels[1:]) if l != -100])


def test_json_csv_and_parquet_files_load_like_jsonl(tiny_base, tmp_path):
    import pandas as pd

    recs = [{"prompt": f"2+{i}=", "completion": str(2 + i)} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    pd.DataFrame(recs).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(recs).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = {}
    for ext in ("jsonl", "json", "csv", "parquet"):
        _, train, info = examples(job(tiny_base, [str(tmp_path / f"d.{ext}")]))
        got[ext] = [e.input_ids for e in train]
        assert len(info["dataset_sha256"][str(tmp_path / f"d.{ext}")]) == 64
    assert got["json"] == got["jsonl"] == got["csv"] == got["parquet"] and len(got["json"]) == 3


def test_field_mapping_and_roles_to_train(tiny_base, tmp_path):
    import pandas as pd

    rows = [
        {
            "conv": [
                {"from": "system", "value": "be terse"},
                {"from": "human", "value": "hello there"},
                {"from": "gpt", "value": "hi"},
            ]
        }
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "sg.parquet")
    spec = {
        "path": str(tmp_path / "sg.parquet"),
        "field_messages": "conv",
        "message_property_mappings": {"role": "from", "content": "value"},
    }
    tok, train, _ = examples(job(tiny_base, [spec]))
    text = trained_text(tok, train[0])
    assert text.startswith("hi") and "hello" not in text
    tok, train, _ = examples(job(tiny_base, [{**spec, "roles_to_train": ["human", "gpt"]}]))
    text = trained_text(tok, train[0])
    assert "hello there" in text and "hi" in text and "be terse" not in text
    with pytest.raises(DataError, match=r"sg.parquet\[row 0\]: no field 'dialog'"):
        examples(job(tiny_base, [{**spec, "field_messages": "dialog"}]))


def test_hub_dataset_resolves_offline_from_the_cache(tiny_base, hub, tmp_path):
    from helpers import make_hub_cache

    train = "".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(5))
    test = "".join(json.dumps(chat(f"t{i}", f"b{i}")) + "\n" for i in range(2))
    snap = make_hub_cache(
        hub, "acme/qa", {"data/train.jsonl": train.encode(), "data/test.jsonl": test.encode()}, repo_type="dataset"
    )
    _, rows, info = examples(job(tiny_base, [{"path": "acme/qa"}]))
    assert len(rows) == 5 and info["dataset_sha256"]["acme/qa"] == f"hub:acme/qa@{snap.name}"
    _, rows, _ = examples(job(tiny_base, [{"path": "acme/qa", "split": "test"}]))
    assert len(rows) == 2
    _, rows, _ = examples(job(tiny_base, [{"path": f"acme/qa@{snap.name}"}]))  # pinned to a commit
    assert len(rows) == 5
    with pytest.raises(DataError, match="hub dataset 'acme/missing' is not in the local hub cache"):
        examples(job(tiny_base, [{"path": "acme/missing"}]))
    with pytest.raises(JobConfigError, match="dataset file not found"):  # spelled like a file: never a hub id
        job(tiny_base, [{"path": "acme/qa.jsonl"}])


def test_hub_dataset_config_name_resolves_offline_and_a_missing_one_is_named(tiny_base, hub):
    """`name:` picks one of a hub dataset's configurations (declared in its README's `configs:`, the hub's way)."""
    from helpers import make_hub_cache

    card = (
        "---\nconfigs:\n"
        "- config_name: short\n  data_files:\n  - split: train\n    path: short/train.jsonl\n"
        "- config_name: long\n  data_files:\n  - split: train\n    path: long/train.jsonl\n"
        "  - split: test\n    path: long/test.jsonl\n---\n# acme/multi\n"
    )
    rows = lambda tag, n: "".join(json.dumps(chat(f"{tag} q{i}", f"{tag} a{i}")) + "\n" for i in range(n)).encode()  # noqa: E731
    make_hub_cache(
        hub,
        "acme/multi",
        {"README.md": card.encode(), "short/train.jsonl": rows("s", 3), "long/train.jsonl": rows("l", 6),
         "long/test.jsonl": rows("t", 2)},
        repo_type="dataset",
    )
    tok, short, _ = examples(job(tiny_base, [{"path": "acme/multi", "name": "short"}]))
    assert len(short) == 3 and trained_text(tok, short[0]).startswith("s a0")
    tok, long, _ = examples(job(tiny_base, [{"path": "acme/multi", "name": "long"}]))
    assert len(long) == 6 and trained_text(tok, long[0]).startswith("l a0")
    _, test, _ = examples(job(tiny_base, [{"path": "acme/multi", "name": "long", "split": "test"}]))
    assert len(test) == 2
    missing = r"acme/multi: cannot load the dataset \(config 'medium', split 'train'\): .*'medium' not found.*'short', 'long'"
    with pytest.raises(DataError, match=missing):
        examples(job(tiny_base, [{"path": "acme/multi", "name": "medium"}]))


def test_hub_model_and_hub_adapter_resolve_offline(tiny_base, hub, tmp_path):
    from helpers import make_hub_cache, make_peft_adapter

    from loraplex.adapters_store.base_model import BaseModelError, model_id_for, resolve_base_model
    from loraplex.trainer.cli import run_job

    snap = make_hub_cache(hub, "acme/tiny-llama", {"": tiny_base})
    assert resolve_base_model("acme/tiny-llama") == snap and model_id_for(snap) == "acme/tiny-llama"
    with pytest.raises(BaseModelError, match="hub model 'acme/nope' is not in the local hub cache"):
        resolve_base_model("acme/nope")
    ada = make_peft_adapter(tiny_base, tmp_path / "ada", r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    make_hub_cache(hub, "acme/start", {"": ada})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(4)))
    cfg = job(
        "acme/tiny-llama",
        [str(data)],
        max_steps=2,
        adapter={
            "name": "from-hub",
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_from": "acme/start",
        },
    )
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="t")
    assert v.lineage["started_from"] == "acme/start" and v.lineage["base_model_id"] == "acme/tiny-llama"
    # a hub adapter goes through the same validation as a local one: a pickle is refused, nothing is registered
    (tmp_path / "pickled").mkdir()
    for f in ada.iterdir():
        (tmp_path / "pickled" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    make_hub_cache(hub, "acme/pickled", {"": tmp_path / "pickled"})
    from loraplex.adapters_store.errors import InvalidAdapter

    bad = job(
        "acme/tiny-llama",
        [str(data)],
        max_steps=1,
        adapter={
            "name": "bad",
            "r": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_from": "acme/pickled",
        },
    )
    with pytest.raises(InvalidAdapter, match="pickle"):
        run_job(bad, tmp_path / "run2", tmp_path / "store", resume=False, caller="t")
    missing = job(
        "acme/tiny-llama",
        [str(data)],
        max_steps=1,
        adapter={"name": "bad", "r": 4, "alpha": 8, "init_from": "acme/gone"},
    )
    with pytest.raises(InvalidAdapter, match="'acme/gone' is not in the local hub cache"):
        run_job(missing, tmp_path / "run3", tmp_path / "store", resume=False, caller="t")
    from loraplex.adapters_store import AdapterStore

    assert [x.name for x in AdapterStore(tmp_path / "store").list()] == ["from-hub"]


def test_hub_adapters_over_the_api_only_from_allowed_orgs(tiny_base, hub, tmp_path):
    import httpx

    from conftest import start_server
    from helpers import make_hub_cache, make_peft_adapter

    ada = make_peft_adapter(tiny_base, tmp_path / "ada", r=4, alpha=8)
    snap = make_hub_cache(hub, "acme/ada", {"": ada})
    make_hub_cache(hub, "evil/ada", {"": ada})
    closed = start_server(tmp_path / "closed", tiny_base)
    try:
        r = httpx.post(f"{closed.url}/v1/adapters", json={"name": "h", "path": "acme/ada"})
        assert r.status_code == 403 and "--allow-hub-org" in r.json()["error"]["message"]
    finally:
        closed.stop()
    s = start_server(tmp_path / "open", tiny_base, hub_orgs=["acme"])
    try:
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": "h", "path": "acme/ada"})
        assert r.status_code == 201, r.text
        assert s.state.store.get("h").lineage["source"] == f"hub:acme/ada@{snap.name}"
        chat = httpx.post(
            f"{s.url}/v1/chat/completions",
            json={"model": "h", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": "e", "path": "evil/ada"})
        assert r.status_code == 403 and "'evil'" in r.json()["error"]["message"]
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": "m", "path": "acme/missing"})
        assert r.status_code == 422 and "'acme/missing'" in r.json()["error"]["message"]
        assert [v.name for v in s.state.store.list()] == ["h"]  # the refusals changed nothing
    finally:
        s.stop()
