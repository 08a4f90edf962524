"""The engine gives the same tokens with the PyTorch LoRA ops and with the Triton kernels
(Triton's interpreter on CPU, the GPU when there is one)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_engine_parity import PROMPTS, run_batch  # noqa: E402

from loraplex.server.engine.request import SamplingParams  # noqa: E402


def build(tiny_base, adapter_dirs, tmp_path, backend, monkeypatch):
    from loraplex.server.runtime import ServeConfig, build_state

    monkeypatch.setenv("LORAPLEX_KERNELS", backend)  # read once, when the runner is built
    cfg = ServeConfig(model=str(tiny_base), store=tmp_path / backend, max_loras=4, kv_cache_tokens=4096)
    cfg.adapters = {n: str(p) for n, p in adapter_dirs.items()}
    st = build_state(cfg)
    assert st.engine.runner.lora_ctx.backend.name == backend
    return st


def test_same_tokens_with_torch_and_triton_kernels(tiny_base, adapter_dirs, tmp_path, monkeypatch):
    items = list(PROMPTS.items())
    params = lambda i: SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, return_logits=True)
    state = build(tiny_base, adapter_dirs, tmp_path, "torch", monkeypatch)
    try:
        ref = run_batch(state, items, params_for=params)
    finally:
        state.engine.shutdown()
    state = build(tiny_base, adapter_dirs, tmp_path, "triton", monkeypatch)
    from loraplex.kernels import triton_lora

    variants = []  # per shrink call: gathered (BGMV) or segmented (SGMV)
    real = triton_lora.lora_shrink_triton

    def spy(x, A, seg, *rest):
        variants.append("bgmv" if triton_lora.batch_plan(seg, x.device).gathered else "sgmv")
        return real(x, A, seg, *rest)

    monkeypatch.setattr(triton_lora, "lora_shrink_triton", spy)
    try:
        got = run_batch(state, items, params_for=params)
    finally:
        state.engine.shutdown()
    # the prompts are prefilled with the segmented kernels, then one token per request is decoded with the gathered ones
    assert set(variants) == {"sgmv", "bgmv"}, set(variants)
    for (name, _), (t_ref, l_ref), (t_got, l_got) in zip(items, ref, got):
        assert t_got == t_ref, name
        for a, b in zip(l_got, l_ref):
            assert (a - b).abs().max().item() < 1e-3, name
