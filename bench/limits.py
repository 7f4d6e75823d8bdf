"""Limits of this machine at the benchmark's thread count: peak matmul FLOP/s (fp32, bf16), memory bandwidth
(a large copy, and a large read), the rate a bf16 matrix-vector product streams weights (what decode does),
and disk write (fsynced) / cold read bandwidth. The other benchmarks report their throughput as a fraction
of these. A limit is the best of the repeats (other processes on a shared machine only ever lower a
measurement, so the best repeat is the closest to what the machine can do); medians are kept in the JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bench.common import MIB, BenchContext, Timing, command_line, drop_page_cache, main_for, repeat, table

NAME = "limits"


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """GFLOP/s of an n x n @ n x n product (2 n^3 FLOPs) at each size; the peak is the best median."""
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        timing = repeat(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), warmup=1, repeats=repeats)
        per_size[str(n)] = {"gflops": 2 * n**3 / min(timing.values) / 1e9,
                            "gflops_median": 2 * n**3 / timing.median / 1e9, **timing.to_dict()}
    return {"peak_gflops": max(v["gflops"] for v in per_size.values()), "by_size": per_size}


def memory_bandwidth(nbytes: int, repeats: int) -> dict[str, Any]:
    """GB/s of a copy (read + write counted) and of a reduction (read only) over `nbytes` of fp32, and the
    weight bytes/s of a bf16 matrix-vector product over `nbytes` of weights (best repeat of each)."""
    copy, read = _copy_and_read(nbytes, repeats)
    side = int((nbytes // 2) ** 0.5)
    weight = torch.empty(side, side, dtype=torch.bfloat16).normal_()
    vec = torch.randn(1, side).to(torch.bfloat16)
    gemv = repeat(lambda: torch.nn.functional.linear(vec, weight), warmup=1, repeats=repeats)
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's own kernel (what bench_patches/02 switches to)
        gemv_aten = repeat(lambda: torch.nn.functional.linear(vec, weight), warmup=1, repeats=repeats)
    out = {
        "copy_gbps": 2 * nbytes / min(copy.values) / 1e9,
        "read_gbps": nbytes / min(read.values) / 1e9,
        "bf16_gemv_gbps": weight.numel() * 2 / min(gemv.values) / 1e9,
        "bf16_gemv_aten_gbps": weight.numel() * 2 / min(gemv_aten.values) / 1e9, "bf16_gemv_aten": gemv_aten.to_dict(),
        "copy": copy.to_dict(), "read": read.to_dict(), "bf16_gemv": gemv.to_dict(), "bytes": nbytes,
    }
    out["bandwidth_gbps"] = max(out["copy_gbps"], out["read_gbps"])
    return out


def _copy_and_read(nbytes: int, repeats: int) -> tuple[Timing, Timing]:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return (repeat(lambda: dst.copy_(src), warmup=1, repeats=repeats),
            repeat(lambda: src.sum(), warmup=1, repeats=repeats))


def disk_bandwidth(folder: Path, nbytes: int, repeats: int) -> dict[str, Any]:
    """Write `nbytes` in 16 MiB chunks and fsync; then read it back after evicting it from the page cache."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk_probe.bin"
    chunk = os.urandom(16 * MIB)
    n_chunks = max(1, nbytes // len(chunk))
    total = n_chunks * len(chunk)

    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for _ in range(n_chunks):
                f.write(chunk)
            os.fsync(f.fileno())

    buf = bytearray(len(chunk))

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    try:
        writes = repeat(write, warmup=0, repeats=repeats)
        reads = []
        for _ in range(repeats):
            drop_page_cache([path])
            reads.append(repeat(read, warmup=0, repeats=1).values[0])
        read_timing = Timing(tuple(reads))
    finally:
        path.unlink(missing_ok=True)
    return {"write_gbps": total / min(writes.values) / 1e9, "cold_read_gbps": total / min(read_timing.values) / 1e9,
            "bytes": total, "write": writes.to_dict(), "read": read_timing.to_dict()}


def run(ctx: BenchContext) -> dict[str, Any]:
    reps = ctx.reps(full=5, smoke=1)
    sizes = (256,) if ctx.smoke else (1024, 2048, 4096)
    ctx.settle()
    fp32 = matmul_peak(torch.float32, sizes, reps)
    ctx.settle()
    bf16 = matmul_peak(torch.bfloat16, sizes, reps)
    ctx.settle()
    mem = memory_bandwidth(16 * MIB if ctx.smoke else 1024 * MIB, reps)
    ctx.settle()
    disk = disk_bandwidth(ctx.work_dir, 32 * MIB if ctx.smoke else 1024 * MIB, reps)
    lim = {
        "fp32_gflops": fp32["peak_gflops"], "bf16_gflops": bf16["peak_gflops"],
        "mem_gbps": mem["bandwidth_gbps"], "mem_copy_gbps": mem["copy_gbps"], "mem_read_gbps": mem["read_gbps"],
        "bf16_gemv_gbps": mem["bf16_gemv_gbps"], "bf16_gemv_aten_gbps": mem["bf16_gemv_aten_gbps"],
        "disk_write_gbps": disk["write_gbps"], "disk_read_gbps": disk["cold_read_gbps"],
    }
    rows = [
        {"limit": "matmul fp32", "value": lim["fp32_gflops"], "unit": "GFLOP/s",
         "how": f"n x n matmul, best size of n in {list(sizes)}"},
        {"limit": "matmul bf16", "value": lim["bf16_gflops"], "unit": "GFLOP/s", "how": "same, bfloat16"},
        {"limit": "memory copy", "value": lim["mem_copy_gbps"], "unit": "GB/s",
         "how": f"{mem['bytes'] // MIB} MiB fp32 copy, read + write counted"},
        {"limit": "memory read", "value": lim["mem_read_gbps"], "unit": "GB/s", "how": "sum over the same tensor"},
        {"limit": "bf16 GEMV weight stream", "value": lim["bf16_gemv_gbps"], "unit": "GB/s",
         "how": "x [1, n] @ W.T, W [n, n] bf16 (a decode step's linear layers): weight bytes / time"},
        {"limit": "bf16 GEMV, oneDNN off", "value": lim["bf16_gemv_aten_gbps"], "unit": "GB/s",
         "how": "the same product on ATen's kernel (torch.backends.mkldnn disabled)"},
        {"limit": "disk write", "value": lim["disk_write_gbps"], "unit": "GB/s",
         "how": f"{disk['bytes'] // MIB} MiB in 16 MiB writes + fsync"},
        {"limit": "disk cold read", "value": lim["disk_read_gbps"], "unit": "GB/s",
         "how": "same file after POSIX_FADV_DONTNEED"},
    ]
    tables = table(f"Machine limits ({ctx.threads} threads)", rows, ["limit", "value", "unit", "how"])
    return {"limits": lim, "rows": rows, "detail": {"fp32": fp32, "bf16": bf16, "memory": mem, "disk": disk},
            "tables": tables}


def command(ctx: BenchContext) -> str:
    return command_line("bench.limits", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))
