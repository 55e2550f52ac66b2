"""What this CPU can do and how many threads astfad uses.

Kernels are chosen from capability flags, never by timing on the hot path: a timing probe of
bfloat16 matrix products took 47-123 CPU-seconds per process on an AVX2-only EPYC, where bfloat16
runs in software about 70x slower than float32. One `threads` setting is applied to torch, faiss
and ONNX Runtime alike, so that one library's threads never compete with another's.
"""

from __future__ import annotations

import functools

import faiss
import torch

# x86 flags of /proc/cpuinfo that mean hardware bfloat16 dot products (Zen 4+, Cooper Lake+, AMX).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty when the
    file cannot be read (not Linux), which selects the portable float32 kernels."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def native_bf16() -> bool:
    """Whether bfloat16 matrix products run in hardware here: the CPU reports avx512_bf16 or
    amx_bf16 and torch dispatches its AVX512 kernels (ATEN_CPU_CAPABILITY can lower that).
    Decided once per process from flags, in well under a millisecond."""
    return bool(cpu_flags() & BF16_FLAGS) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_threads(threads: int | None) -> int:
    """The thread count to use: `threads` when given, else torch's own count (all physical
    cores, or OMP_NUM_THREADS when that is set)."""
    if threads is None:
        return torch.get_num_threads()
    if int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return int(threads)


def apply_threads(threads: int | None) -> int:
    """Set torch's and faiss's thread counts to one number and return it (for ONNX Runtime's
    sessions); `None` keeps torch's count and gives faiss the same."""
    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)
    return count
