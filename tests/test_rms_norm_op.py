"""The model runner's RMSNorm gives exactly the floats of the model's own RMSNorm module."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraplex.server.engine.model_runner import _rms_norm_op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_op_equals_the_module(dtype):
    g = torch.Generator().manual_seed(0)
    norms = []
    for width, eps in ((576, 1e-5), (64, 1e-6)):
        n = LlamaRMSNorm(width, eps=eps).to(dtype)
        with torch.no_grad():
            n.weight.copy_(torch.randn(width, generator=g))
        norms.append(n)
    op = _rms_norm_op(norms, dtype, "cpu")
    # fp32 takes the five-op formula; a 16-bit model another exact path (HF computes its statistics in fp32)
    assert (op.__name__ == "five_ops") == (dtype == torch.float32)
    with torch.inference_mode():
        for n in norms:
            for rows, scale in ((32, 1.0), (300, 1e-3), (3, 1e3)):
                x = (torch.randn(rows, n.weight.shape[0], generator=g) * scale).to(dtype)
                assert torch.equal(op(n, x), n(x))
