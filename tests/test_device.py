"""Device and precision resolution: one rule for training, sampling and evaluation."""

from __future__ import annotations

import pytest
import torch

from imagen_ops import device as device_module
from imagen_ops.device import resolve_device, use_bf16

CPU = torch.device("cpu")


def test_auto_device_is_cpu_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native) -> None:
    """On an AVX2-only CPU oneDNN emulates bf16 (~70x slower than fp32, BENCHMARKS.md):
    "auto" must then mean fp32; explicit settings are obeyed either way."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert use_bf16("auto", CPU) is native
    assert use_bf16("bf16", CPU) is True and use_bf16("fp32", CPU) is False
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of: auto"):
        use_bf16("fp16", CPU)


def test_native_bf16_is_a_cpu_or_cuda_property(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert device_module.native_bf16(CPU) is True
    assert device_module.native_bf16(torch.device("meta")) is False
