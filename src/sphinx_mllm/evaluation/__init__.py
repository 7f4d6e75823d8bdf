"""L7 evaluation: benchmark registry and loaders, the runner (generate with the release's prompts, score,
write a run folder), judge-scored benchmarks, D3 described detection, and harness adapters (lmms-eval,
VLMEvalKit)."""

from sphinx_mllm.evaluation.benchmarks import BENCHMARKS, Benchmark, EvalItem, get_benchmark, load_items
from sphinx_mllm.evaluation.judge import Judge, JudgeConfig
from sphinx_mllm.evaluation.runner import load_run, metrics_table, run_benchmark, score_items

__all__ = [
    "BENCHMARKS", "Benchmark", "EvalItem", "Judge", "JudgeConfig", "get_benchmark", "load_items", "load_run",
    "metrics_table", "run_benchmark", "score_items",
]
