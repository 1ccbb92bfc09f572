"""Where tensors live and in what precision: one rule for every command.

device "auto" is CUDA when present, else the CPU. precision "auto" is bfloat16 autocast
where the hardware computes it natively (CUDA with bf16, a CPU with AVX512-BF16 / AMX,
as oneDNN reports), else float32: on an AVX2-only CPU bf16 is emulated, ~59x slower
than float32 for a convolution block and ~12x for a training step (BENCHMARKS.md); on a
native one the demo trains ~1.5x faster.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import torch

from imagen_ops.choices import Choices

__all__ = ["PRECISIONS", "cpu_name", "environment", "resolve_device", "use_bf16"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


PRECISIONS: Choices[Callable[[torch.device], bool]] = Choices(
    "precision",
    {"auto": native_bf16, "fp32": lambda device: False, "bf16": lambda device: True},
)
"""Precision name -> whether it means bf16 autocast on a device."""


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` ("auto", "fp32" or "bf16") means bf16 autocast on `device`."""
    return PRECISIONS[precision](device)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str | int]:
    """What trained weights depend on besides data, params and seed: CPU kernels split
    their sums by thread count and instruction set, so a bit-for-bit rebuild needs the same
    torch, CPU type and `threads` (docs/architecture.md, "Determinism")."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "gpu": gpu,
    }
