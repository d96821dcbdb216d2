"""Throughput accounting: FLOPs per token and model FLOPs utilisation (MFU).

Convention (PaLM / nanoGPT / torchtitan): training FLOPs per token = 6 N + 12 L d T, with N = all parameters
(embeddings included), L layers, d model width, T sequence length (the attention term counts QK^T and AV,
forward and backward, without halving for causality). MFU = achieved FLOP/s / the device's dense bf16 peak.
"""

from __future__ import annotations

import resource
import sys

import torch

from models import GPTConfig

# dense bf16 peak FLOP/s, by device-name fragment
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    return 6.0 * num_params + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def peak_flops(override_tflops: float = 0.0) -> float | None:
    """The device's peak in FLOP/s; None where unknown (CPUs), so no MFU is reported rather than a wrong one."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_metrics() -> dict[str, float]:
    """Peak memory of this process so far, in GiB: host resident set (pinned optimizer state included) and,
    on a GPU, what PyTorch's allocator handed out. Host-side counters only: no device sync."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    metrics = {"perf/host_peak_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    if torch.cuda.is_available():
        metrics["perf/gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics
