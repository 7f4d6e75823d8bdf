"""`bench/run_all` (= `python -m bench`): every benchmark in turn, each writing `<out>/<name>.json`, then
`<out>/summary.md` with all tables. `--smoke` runs them all at tiny sizes (a check that they work, not a
measurement). A benchmark that fails is recorded as `{"error": ...}` in its JSON and the others still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from typing import Any

from bench.common import (
    BenchContext,
    add_common_arguments,
    context_from_args,
    emit,
    machine_record,
    run_benchmark,
    write_result,
)

ORDER = ("limits", "preprocessing", "inference", "mixing", "conversion", "training")


def run_one(name: str, ctx: BenchContext) -> bool:
    module = importlib.import_module(f"bench.{name}")
    emit(f"== {name}")
    try:
        payload, path = run_benchmark(module, ctx)
    except Exception as exc:  # recorded, and the next benchmark still runs
        write_result(ctx, name, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
                     module.command(ctx))
        emit(f"{name} FAILED: {type(exc).__name__}: {exc}")
        return False
    emit(payload.get("tables", ""))
    emit(f"({payload['benchmark_seconds']:.0f} s; other processes kept {payload['foreign_load_cores']:.2f} cores "
         f"busy meanwhile) -> {path}")
    return True


def write_summary(ctx: BenchContext, names: list[str], ran: list[str], seconds: float) -> None:
    """summary.md: the tables of every result in the folder (`names`), each with its command and date."""
    from bench.common import read_result
    from sphinx_mllm.utils import atomic_write_text

    machine = machine_record(ctx.threads)
    parts = [f"# Benchmark results ({'smoke' if ctx.smoke else 'full'} run)", "",
             f"{machine['date_utc']}, {machine['cpu_model']} ({machine['cores_usable']} cores usable, "
             f"{ctx.threads} torch threads), torch {machine['versions']['torch']}, "
             f"transformers {machine['versions']['transformers']}; this `bench/run_all` ran "
             f"{', '.join(ran) or 'no benchmark (summary only)'} in {seconds:.0f} s. Each table's own date and "
             "machine are in its JSON.", ""]
    for name in names:
        result: dict[str, Any] | None = read_result(ctx, name)
        if result is None:
            continue
        if "error" in result:
            parts.append(f"### {name}: FAILED\n\n{result['error']}\n")
        else:
            parts.append(result.get("tables", ""))
            parts.append(f"Command: `{result['command']}` ({result['machine']['date_utc']}); other processes kept "
                         f"{result.get('foreign_load_cores', 0):.2f} cores busy meanwhile.\n")
    atomic_write_text(ctx.out_dir / "summary.md", "\n".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run_all", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--bench", nargs="+", choices=ORDER, default=list(ORDER), help="benchmarks to run")
    parser.add_argument("--skip", nargs="+", choices=ORDER, default=(), help="benchmarks to leave out")
    args = parser.parse_args()
    ctx = context_from_args(args)
    names = [n for n in ORDER if n in args.bench and n not in args.skip]
    start = time.perf_counter()
    ok = True
    for name in names:
        ok = run_one(name, ctx) and ok
    write_summary(ctx, list(ORDER), names, time.perf_counter() - start)  # every result in the folder, old or new
    emit(f"all done in {time.perf_counter() - start:.0f} s; summary: {ctx.out_dir / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
