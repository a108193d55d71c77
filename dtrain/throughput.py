"""Throughput of the training loop: samples/s, tokens/s, step time, data-wait fraction, peak memory, MFU.

Everything here is host-side bookkeeping: perf_counter around the wait for the next batch, and clock
readings only when a log line is written. The trainer logs right after an all-reduce that already
synchronises the device (`.tolist()` of the losses), so the time read there includes all queued GPU
work and measuring adds no sync of its own to the step.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable, Iterator, Optional

import torch

# Dense bf16 tensor-core peak FLOP/s of one device (vendor data sheets; sparsity not counted).
PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device, configured: Optional[float] = None) -> Optional[float]:
    """train.peak_flops, else the table entry whose name is in the CUDA device's; None on CPU or unknown GPUs."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_FLOPS_BF16.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20  # allocator statistics: no device sync
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Throughput:
    """Accumulates steps and the time spent waiting for batches between two log lines."""

    def __init__(
        self,
        samples_per_step: int,
        tokens_per_sample: Optional[int],
        flops_per_sample: Optional[float],
        peak_flops_per_device: Optional[float],
        world_size: int,
        device: torch.device,
    ):
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.flops_per_sample, self.peak = flops_per_sample, peak_flops_per_device
        self.world_size, self.device = world_size, device
        self.total_data_wait = 0.0  # over the whole start (the end-of-run summary)
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, adding the time blocked in next() (loading, or a DataLoader starting) to data_wait."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            waited = time.perf_counter() - t
            self.data_wait += waited
            self.total_data_wait += waited
            yield item

    def step(self) -> None:
        self.steps += 1

    def record(self) -> dict:
        """Metrics of the steps since the last reset (call at a point where the device is synchronised)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        samples_per_s = self.steps * self.samples_per_step / elapsed
        tokens = {"tokens_per_s": samples_per_s * self.tokens_per_sample} if self.tokens_per_sample else {}
        out = {
            "samples_per_s": samples_per_s,
            **tokens,  # tokens only where the inputs are tokens
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_frac": min(self.data_wait / elapsed, 1.0),
            "peak_mem_mb": peak_memory_mb(self.device),
        }
        if self.flops_per_sample and self.peak:
            # samples_per_s is global (all ranks): divide by every rank's peak
            out["mfu"] = self.flops_per_sample * samples_per_s / (self.peak * self.world_size)
        return out
