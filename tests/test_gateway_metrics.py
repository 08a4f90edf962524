"""The vLLM-named metrics the Kubernetes inference gateway (Gateway API Inference Extension / llm-d) and AIBrix
read, scraped from a real server while one adapter's request runs and another's waits, parsed with the
Prometheus text parser."""
from __future__ import annotations

import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_server


def _scrape(url: str) -> dict:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return fams


def test_vllm_named_metrics_carry_running_and_waiting_adapters(tmp_path, tiny_base, adapter_dirs):
    s = start_server(tmp_path, tiny_base, max_loras=3, max_num_seqs=1, kv_cache_tokens=4096)
    try:
        for name in ("alpha", "beta"):
            r = httpx.post(f"{s.url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[name])}, timeout=60)
            assert r.status_code == 201, r.text
        idle = _scrape(s.url)
        (info,) = idle["vllm:lora_requests_info"].samples
        assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "3"}
        assert abs(info.value - time.time()) < 60  # vLLM's value: the time of the sample
        assert idle["vllm:num_requests_running"].samples[0].value == 0

        results = []

        def ask(model):
            body = {"model": model, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0}
            results.append(httpx.post(f"{s.url}/v1/completions", json=body, timeout=120).status_code)

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("alpha", "beta@1")]
        threads[0].start()
        time.sleep(0.05)
        threads[1].start()
        seen = None
        deadline = time.time() + 60
        while time.time() < deadline and seen is None:
            fams = _scrape(s.url)
            labels = fams["vllm:lora_requests_info"].samples[0].labels
            running = fams["vllm:num_requests_running"].samples[0]
            waiting = fams["vllm:num_requests_waiting"].samples[0]
            if labels["running_lora_adapters"] and labels["waiting_lora_adapters"]:
                seen = labels, running, waiting, fams
            time.sleep(0.01)
        for t in threads:
            t.join(120)
        assert results == [200, 200]
        assert seen is not None, "never saw one adapter running while another waited"
        labels, running, waiting, fams = seen
        assert {labels["running_lora_adapters"], labels["waiting_lora_adapters"]} == {"alpha", "beta"}
        assert labels["max_lora"] == "3"
        assert running.value == 1 and waiting.value >= 1
        assert running.labels == {"model_name": s.state.telemetry.base_id}
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            usage = fams[name].samples[0].value
            assert 0 < usage <= 1
        assert "loraplex_requests" in fams  # ours stay beside them
        after = _scrape(s.url)["vllm:lora_requests_info"].samples
        assert len(after) == 1 and after[0].labels["running_lora_adapters"] == ""
    finally:
        s.stop()
