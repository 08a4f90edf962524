"""The engine's packed oneDNN GEMM for frozen base weights on CPU (kernels/cpu_gemm.py)."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import cpu_gemm

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_available_on_x86_builds():
    # torch's x86 wheels ship oneDNN: if the self-check fails there, the engine silently lost its CPU GEMM
    if X86:
        assert cpu_gemm._self_check() is None
        assert cpu_gemm.available(torch.zeros(4, 4))


@pytest.mark.skipif(cpu_gemm._self_check() is not None, reason="no working oneDNN linear in this build")
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 80, generator=g)
    p = cpu_gemm.pack(w)
    got = cpu_gemm.packed_linear(x, p, b)
    assert got.shape == (rows, 96) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # 3-D input and a non-contiguous one (a transposed view)
    x3 = torch.randn(2, 3, 80, generator=g)
    torch.testing.assert_close(cpu_gemm.packed_linear(x3, p, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(80, rows, generator=g).t()
    torch.testing.assert_close(cpu_gemm.packed_linear(xt, p, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)


def test_switch_and_bad_value(monkeypatch):
    w = torch.zeros(4, 4)
    monkeypatch.setenv("LORAPLEX_CPU_GEMM", "torch")
    assert not cpu_gemm.available(w)
    monkeypatch.setenv("LORAPLEX_CPU_GEMM", "fastest")
    with pytest.raises(ValueError, match="LORAPLEX_CPU_GEMM='fastest'"):
        cpu_gemm.available(w)
    monkeypatch.delenv("LORAPLEX_CPU_GEMM")
    assert not cpu_gemm.available(w.to(torch.bfloat16))  # only fp32 weights are packed


def _runner_logits(tiny_base, adapter_dir, monkeypatch, choice):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.kernels import LoraSegments
    from loraplex.server.engine.model_runner import ModelRunner, SeqChunk, StepBatch
    from loraplex.trainer.rollout import lora_weights

    monkeypatch.setenv("LORAPLEX_CPU_GEMM", choice)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    runner = ModelRunner(base, max_loras=2, kv_budget_tokens=1024, owns_weights=True)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter_dir)
    w, s = lora_weights(peft, runner.lora_modules)
    for name, (A, B) in w.items():
        runner.lora_modules[name].set_slot(0, A, B, s[name])
    ids = [5, 17, 300, 42, 7, 99, 1000]
    cache = runner.kv.new_cache()
    cache.reserve(len(ids))
    batch = StepBatch(torch.tensor(ids), torch.arange(len(ids)), [SeqChunk(cache, 0, len(ids), 0)],
                      LoraSegments.from_token_slots([0] * len(ids)), torch.arange(len(ids)))
    logits, _ = runner.forward(batch)
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([ids])).logits[0].float()
    return runner, logits, ref


@pytest.mark.skipif(cpu_gemm._self_check() is not None, reason="no working oneDNN linear in this build")
def test_runner_with_packed_weights_matches_peft_and_drops_the_unpacked_copy(tiny_base, adapter_dirs, monkeypatch):
    runner, logits, ref = _runner_logits(tiny_base, adapter_dirs["alpha"], monkeypatch, "auto")
    assert runner.cpu_gemm and runner.lm_head_packed is not None
    # every base product is packed, q/k/v and gate/up together (one GEMM each), and no unpacked copy is left
    assert all((m.packed is not None) != (m.group is not None and m.group.packed is not None)
               and m.base.weight.numel() == 0 for m in runner.lora_modules.values())
    assert all(len(qkv.members) == 3 and qkv.packed is not None and gate_up.packed is not None
               for qkv, gate_up in runner.groups)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    plain, logits_t, _ = _runner_logits(tiny_base, adapter_dirs["alpha"], monkeypatch, "torch")
    assert not plain.cpu_gemm and all(m.packed is None and m.base.weight.numel() > 0 for m in plain.lora_modules.values())
    assert all(g.packed is None for pair in plain.groups for g in pair)  # each projection runs alone
    torch.testing.assert_close(logits, logits_t, rtol=1e-4, atol=1e-4)


def test_adapter_loading_off_the_engine_thread_starts_no_openmp_team(adapter_dirs):
    # Loading runs on request threads; with an OpenMP team of its own there, libgomp would throttle
    # the engine thread's team (see peft_format.one_intra_op_thread). Inside, torch runs one thread.
    import threading

    from loraplex.adapters_store import peft_format

    seen = {}
    real = torch.Tensor.to

    def spy(self, *a, **kw):
        seen.setdefault("threads", set()).add(torch.get_num_threads())
        return real(self, *a, **kw)

    def load():
        before = torch.get_num_threads()
        manifest = peft_format.validate_adapter_dir(adapter_dirs["alpha"], None)
        torch.Tensor.to = spy
        try:
            w = peft_format.load_adapter_weights(adapter_dirs["alpha"], manifest)
        finally:
            torch.Tensor.to = real
        seen["ok"] = bool(w) and torch.get_num_threads() == before

    t = threading.Thread(target=load)
    t.start()
    t.join()
    assert seen["ok"] and seen["threads"] == {1}
