"""Helpers shared by the benchmarks: the machine record, timing (medians after warm-up, interleaved runs of
ours and the peer), result files (atomic JSON in `bench/results/`), tables, and measured child processes
(wall time and peak memory of a whole process tree).

Every benchmark module exposes `NAME`, `add_arguments(parser)` and `run(ctx) -> dict` (the result payload);
`bench/run_all` (`python -m bench`) runs them in order, and each also runs alone: `python -m bench.limits`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / ".work"
PEERS_VENV = Path(os.environ.get("BENCH_PEERS_VENV", REPO / "bench" / ".venv-peers"))
GB = 1e9
MIB = 1 << 20


@dataclass
class BenchContext:
    """What every benchmark gets: sizes (`smoke`), where to write, the thread count and the repeats."""

    smoke: bool
    out_dir: Path
    work_dir: Path
    threads: int
    repeats: int | None = None  # None: each benchmark's default (fewer in smoke mode)
    only: tuple[str, ...] = ()  # optional sub-selection of rows, benchmark-specific names
    extra: dict[str, Any] = field(default_factory=dict)

    def reps(self, full: int, smoke: int = 1) -> int:
        """Measured repeats: `--repeats` if given, else `full` (or `smoke` in smoke mode)."""
        if self.repeats is not None:
            return self.repeats
        return smoke if self.smoke else full

    def wanted(self, row: str) -> bool:
        return not self.only or row in self.only

    def settle(self) -> float | None:
        """Before a measurement: with `--wait-idle S`, wait up to S seconds for other processes to go quiet.
        Returns the load last seen (cores busy with other processes), None when not waiting."""
        wait = float(self.extra.get("wait_idle") or 0.0)
        return wait_for_idle(wait) if wait > 0 else None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results, or bench/results/smoke with --smoke)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for checkpoints and images (default bench/.work)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core this process may use; 1 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats per row (after warm-up)")
    parser.add_argument("--only", nargs="+", default=(), help="run only these rows (benchmark-specific names)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes to go quiet "
                             "(for shared machines; the load seen is recorded either way)")


def context_from_args(args: argparse.Namespace) -> BenchContext:
    """Build the context and apply the thread count to torch (in this process)."""
    import torch

    # Smoke runs use one thread unless told otherwise: on a shared machine a descheduled second OpenMP thread
    # makes every tiny op wait (seconds per step); smoke checks that things run, it measures nothing.
    threads = args.threads or (1 if args.smoke else len(os.sched_getaffinity(0)))
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    work = args.workdir or (WORK / "smoke" if args.smoke else WORK)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return BenchContext(smoke=args.smoke, out_dir=out, work_dir=work, threads=threads, repeats=args.repeats,
                        only=tuple(args.only), extra=vars(args))


# ----------------------------------------------------------------------------- the machine


def _cpu_model() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
                flags = [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return model, flags


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_record(threads: int) -> dict[str, Any]:
    """Cores, CPU model and ISA flags, memory, torch/transformers versions, threads, load, date (UTC)."""
    import torch

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "safetensors", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    model, flags = _cpu_model()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mem_total_bytes": _mem_total(),
        "versions": versions,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class LoadMonitor:
    """How busy the CPUs were with *other* processes while a benchmark ran (a shared machine skews timings):
    total busy CPU time from /proc/stat minus this process's own (children it waited for included), in cores."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        own = os.times()
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def foreign_cores(self) -> float:
        """Average number of cores other processes kept busy since this monitor started."""
        t0, busy0, own0 = self.start
        t1, busy1, own1 = self._sample()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9))


def wait_for_idle(max_wait: float, threshold: float = 0.3, window: float = 3.0) -> float:
    """Wait (up to `max_wait` s) until other processes keep fewer than `threshold` cores busy over `window`
    seconds; returns the load last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        monitor = LoadMonitor()
        time.sleep(window)
        load = monitor.foreign_cores()
        if load < threshold or time.monotonic() >= deadline:
            return load


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds of the measured repeats (warm-up excluded); `median` is what tables report."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.values) - min(self.values)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": min(self.values), "max_s": max(self.values),
                "spread": self.spread, "values_s": list(self.values)}


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
    """Run `fn` `warmup` times unmeasured, then `repeats` times measured."""
    for _ in range(warmup):
        fn()
    return Timing(tuple(time_call(fn) for _ in range(max(1, repeats))))


def interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Time several contenders in alternating order (A B A B ...) so that load from other processes on a
    shared machine hits each about equally. Each gets `warmup` unmeasured runs first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    values: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(max(1, repeats)):
        order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            values[name].append(time_call(fn))
    return {name: Timing(tuple(v)) for name, v in values.items()}


def median_of(samples: Sequence[Mapping[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


# ----------------------------------------------------------------------------- results


def to_jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN / inf
    return value


def write_result(ctx: BenchContext, name: str, payload: Mapping[str, Any], command: str) -> Path:
    """`<out>/<name>.json`, written atomically: the payload plus the machine, mode, command and date."""
    from sphinx_mllm.utils import atomic_write_text

    record = {"benchmark": name, "smoke": ctx.smoke, "command": command, "machine": machine_record(ctx.threads),
              **to_jsonable(dict(payload))}
    path = ctx.out_dir / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def read_result(ctx: BenchContext, name: str) -> dict[str, Any] | None:
    path = ctx.out_dir / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def limits(ctx: BenchContext) -> dict[str, Any]:
    """The machine limits measured by `bench.limits` in this results folder (measured now if missing or made
    with another thread count)."""
    found = read_result(ctx, "limits")
    if found is not None and found.get("machine", {}).get("torch_threads") == ctx.threads:
        return found["limits"]
    from bench import limits as limits_bench

    payload, _ = run_benchmark(limits_bench, ctx)
    return payload["limits"]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `columns` (keys of each row); missing values print as '-'."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def emit(text: str) -> None:
    print(text, flush=True)


def command_line(module: str, ctx: BenchContext, extra: Iterable[str] = ()) -> str:
    parts = ["python", "-m", module]
    if ctx.smoke:
        parts.append("--smoke")
    parts += ["--threads", str(ctx.threads), *extra]
    return " ".join(parts)


# ----------------------------------------------------------------------------- processes and files


def _tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (from /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes of one process; zeros when it is gone."""
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


@dataclass
class ProcessStats:
    """A measured command: wall seconds, the peak summed over its process tree of the resident set (file
    pages of memory maps included) and of anonymous memory (the part that needs RAM), sampled every 20 ms."""

    seconds: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    returncode: int
    output_tail: str


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 3600.0) -> ProcessStats:
    """Run `cmd`, sampling the memory of its process tree; raises RuntimeError with the output on failure."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = anon = 0
            for pid in _tree_pids(proc.pid):
                r, a = _rss(pid)
                rss, anon = rss + r, anon + a
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        tail = out.decode(errors="replace")[-4000:]
        raise RuntimeError(f"timed out after {timeout} s: {' '.join(cmd)}\n{tail}") from None
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{text[-4000:]}")
    return ProcessStats(seconds, peak[0], peak[1], proc.returncode, text[-2000:])


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict the files' pages from the page cache (fsync first, then POSIX_FADV_DONTNEED), so the next read
    comes from the disk. Needs no privileges; works on clean pages only, hence the fsync."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush written files to the disk (what a tool that does not fsync leaves to the kernel)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in files_under(folder))


def measured_write(cmd: Sequence[str], inputs: Sequence[Path], out: Path, threads: int) -> dict[str, Any]:
    """Run a command that reads the `inputs` folders and writes the `out` folder: inputs evicted from the page
    cache first (cold read), `out` removed first; after it exits, its files are fsynced (durable) and timed."""
    drop_page_cache([p for folder in inputs for p in files_under(folder)])
    shutil.rmtree(out, ignore_errors=True)
    stats = run_measured(cmd, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)})
    start = time.perf_counter()
    fsync_files(files_under(out))
    return {"wall_s": stats.seconds, "durable_s": stats.seconds + time.perf_counter() - start,
            "peak_rss_gb": stats.peak_rss_bytes / GB, "peak_anon_gb": stats.peak_anon_bytes / GB,
            "out_bytes": folder_bytes(out)}


def python_exe() -> str:
    return sys.executable


def run_benchmark(module: Any, ctx: BenchContext) -> tuple[dict[str, Any], Path]:
    """Run one benchmark module, note how busy other processes kept the machine, write its JSON."""
    monitor = LoadMonitor()
    start = time.perf_counter()
    payload = dict(module.run(ctx))
    payload["benchmark_seconds"] = time.perf_counter() - start
    payload["foreign_load_cores"] = monitor.foreign_cores()
    return payload, write_result(ctx, module.NAME, payload, module.command(ctx))


def main_for(module: Any, argv: Sequence[str] | None = None) -> int:
    """Entry point of one benchmark run alone: parse, run, write its JSON, print its tables."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module.NAME}", description=module.__doc__)
    add_common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    ctx = context_from_args(args)
    payload, path = run_benchmark(module, ctx)
    emit(payload.get("tables", ""))
    emit(f"(other processes kept {payload['foreign_load_cores']:.2f} cores busy meanwhile)")
    emit(f"wrote {path}")
    return 0
