"""Where to run and at what precision: device choice, bf16 support, autocast."""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

from .errors import ZaizaiError


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX).

    Elsewhere bf16 autocast is emulated and slower than fp32, so we stay in fp32.
    ``ZAIZAI_CPU_BF16=0/1`` overrides the detection.
    """
    forced = os.environ.get("ZAIZAI_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N|mps`` to a torch.device, refusing ones this machine lacks."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ZaizaiError(f"--device {name}: this PyTorch build sees no CUDA GPU; use --device cpu (or auto)")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ZaizaiError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ZaizaiError(f"unknown --device '{name}'; choose auto, cpu, cuda or mps")


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (None means plain fp32).

    ``dtype``: auto | float32 | bfloat16 | float16. ``auto`` picks bf16 on CUDA GPUs that support it and on
    CPUs with native bf16, else fp32.
    """
    dtype = (dtype or "auto").lower()
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype in ("float16", "fp16"):
        if device.type != "cuda":
            raise ZaizaiError("--dtype float16 needs a CUDA GPU; use bfloat16 or float32")
        return torch.float16
    if dtype != "auto":
        raise ZaizaiError(f"unknown --dtype '{dtype}'; choose auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context manager running the forward pass in ``dtype`` (or a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_glibc_malloc() -> bool:
    """Keep freed memory mapped in the process (glibc only), so the big per-step tensors of training stop
    page-faulting afresh every step: up to a third faster on CPU for the output layer of a large vocabulary.
    Returns False where the C library has no ``mallopt`` (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def enable_tf32() -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (what autocast leaves in fp32)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def idle_cpus(sample_seconds: float = 0.2) -> float | None:
    """How many of this machine's cores other programs leave idle, measured over ``sample_seconds`` from
    /proc/stat (Linux); None where that cannot be read. This process's own CPU time is not counted as busy: its
    OpenMP threads may still be spinning after the work it just did."""
    def totals() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # all, idle + iowait (jiffies)

    try:
        all0, idle0 = totals()
        own0 = time.process_time()
        time.sleep(sample_seconds)
        all1, idle1 = totals()
        own = (time.process_time() - own0) * os.sysconf("SC_CLK_TCK")  # this process's jiffies
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    cpus = os.cpu_count() or 1
    if all1 <= all0:
        return None
    busy_elsewhere = max(0.0, (all1 - all0) - (idle1 - idle0) - own)  # jiffies, summed over the cores
    return cpus - cpus * busy_elsewhere / (all1 - all0)


def default_threads() -> int:
    """Threads for a run that did not choose: PyTorch's default, but no more than the cores that are idle.

    On a busy machine (another CPU-bound program on one of 2 cores) two threads make every parallel op wait at
    its barrier for the thread that was descheduled: measured 5x slower than one thread. OMP_NUM_THREADS, when set,
    is the user's choice and is kept.
    """
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or threads <= 1:
        return threads
    idle = idle_cpus()
    return threads if idle is None else max(1, min(threads, int(idle + 0.5)))


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_threads(threads: int = 0, processes_on_node: int = 1) -> int:
    """Set torch's CPU threads for a run and return them: ``threads`` when given (> 0); with several processes
    on this machine (torchrun, which sets OMP_NUM_THREADS=1) its cores shared among them; else
    :func:`default_threads` (only the cores other programs leave idle)."""
    if threads:
        torch.set_num_threads(threads)
    elif processes_on_node > 1:
        torch.set_num_threads(max(1, available_cpus() // processes_on_node))
    else:
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()
