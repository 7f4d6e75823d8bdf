"""`sphinx-mllm mix A B --beta 0.5 -o OUT`: mix checkpoints tensor by tensor (`sphinx_mllm.merging`).

Options are `MixConfig`'s fields; `--config mix.yaml` reads them from YAML, and flags given beside it win.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sphinx_mllm.merging import METHODS, MixConfig, mix
from sphinx_mllm.merging.mixing import DTYPES
from sphinx_mllm.utils import SphinxError, atomic_write_text


class _Bars:
    """One tqdm bar per stage of the mix (checking kept tensors, mixing), in bytes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, nbytes: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="B", unit_scale=True, unit_divisor=1024)
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mix",
        help="mix model weights (beta * A + (1 - beta) * B, slerp, task arithmetic, TIES, DARE)",
        description=(
            "Merge checkpoints tensor by tensor, streaming (peak memory: a few copies of the largest tensor). "
            "Inputs: safetensors folders (model.safetensors or shards + index) or release consolidated.*.pth "
            "folders. By default the LLM and projections are mixed (language_model.*, fusion.*, llma.*) and the "
            "encoders must be identical in every input and are copied. Output: sharded safetensors, the first "
            "model's config/tokenizer files and mix_info.json; written atomically."
        ),
    )
    parser.add_argument("models", nargs="*", help="the checkpoints to merge, A B ... (linear/slerp: exactly two)")
    parser.add_argument("-o", "--output", default=None, help="output folder (a sweep: one sub-folder per value)")
    parser.add_argument("--config", default=None, metavar="YAML", help="read the options from a YAML file")
    parser.add_argument("--method", default=None, choices=sorted(METHODS), help="merge method (default: linear)")
    parser.add_argument("--beta", type=float, default=None, help="linear: weight of A (1 gives A, 0 gives B)")
    parser.add_argument("--t", type=float, default=None, help="slerp: position from A (0) to B (1)")
    parser.add_argument("--base", default=None, help="base model of task_arithmetic / ties / dare")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="task_arithmetic / ties / dare: one weight per model (default 1 each)")
    parser.add_argument("--density", type=float, default=None,
                        help="ties: fraction of each task vector kept by magnitude; dare: keep probability")
    parser.add_argument("--seed", type=int, default=None, help="dare: seed of the drop masks (default 0)")
    parser.add_argument("--combine", default=None, choices=("linear", "ties"),
                        help="dare: how the dropped task vectors are combined (default linear)")
    parser.add_argument("--include", action="append", default=None, metavar="GLOB",
                        help="also mix tensors matching this pattern (repeatable), e.g. 'vision.encoders.clip.*'")
    parser.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                        help="do not mix these tensors: copy them from A unchecked (repeatable)")
    parser.add_argument("--allow-encoder-mismatch", action="store_true", default=None,
                        help="take kept tensors (encoders) from A even when the inputs differ")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="dtype of the output's float tensors (default: A's)")
    parser.add_argument("--max-shard-size", default=None, help="largest output shard (default 5GB)")
    parser.add_argument("--sweep", default=None, metavar="START:STOP:STEP",
                        help="one model per value of beta (linear) or t (slerp), e.g. 0:1:0.1")
    parser.add_argument("--eval", default=None, metavar="BENCH",
                        help="score each sweep value on this benchmark (a registry name or a records JSONL; "
                             "`sphinx-mllm eval run --help` lists them) and plot score against the value")
    parser.add_argument("--eval-data", default=None, help="--eval: the benchmark's data file or folder")
    parser.add_argument("--eval-images-root", default=None, help="--eval: folder the benchmark's images are under")
    parser.add_argument("--eval-limit", type=int, default=None, help="--eval: score only the first N items")
    parser.add_argument("--eval-metric", default=None,
                        help="--eval: the metric to plot, e.g. 'vqa.accuracy' (default: the first one reported)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


_FIELDS = ("output", "method", "beta", "t", "base", "weights", "density", "seed", "combine", "include", "exclude",
           "allow_encoder_mismatch", "dtype", "max_shard_size", "sweep", "eval", "overwrite")


def build_config(args: argparse.Namespace) -> MixConfig:
    """The config from `--config` (if any) with every flag that was given on top."""
    given: dict[str, Any] = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.models:
        given["models"] = list(args.models)
    if args.config is not None:
        return MixConfig.from_yaml(args.config, overrides=given)
    return MixConfig.from_dict(given, origin="mix")


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    bars = _Bars(enabled=not args.no_progress)
    try:
        report = mix(config, progress=bars)
    finally:
        bars.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    if config.eval is not None:
        score_sweep(config, args)
    return 0


def score_sweep(config: MixConfig, args: argparse.Namespace) -> dict[float, float]:
    """Score every model of a sweep with the evaluation runner; write sweep_scores.json and sweep.png."""
    from sphinx_mllm.evaluation.runner import flatten_metrics, run_benchmark
    from sphinx_mllm.merging import get_method
    from sphinx_mllm.merging.plot import plot_sweep

    assert config.eval is not None and config.output is not None
    param = get_method(config.method).sweep_param or "value"
    out = Path(config.output)
    scores: dict[float, float] = {}
    runs: dict[str, dict[str, float]] = {}
    metric = args.eval_metric
    for folder, params in zip(config.output_folders(), config.output_params()):
        summary = run_benchmark(out / folder, config.eval, out / folder / "eval", limit=args.eval_limit,
                                data=args.eval_data, images_root=args.eval_images_root)
        flat = flatten_metrics(summary["metrics"])
        if not flat:
            raise SphinxError(f"benchmark {config.eval} reported no numeric metric for {folder}")
        metric = metric or next(iter(flat))
        if metric not in flat:
            raise SphinxError(f"metric {metric!r} not among {sorted(flat)}")
        scores[float(params[param])] = flat[metric]
        runs[folder] = flat
        print(f"{folder}: {metric} = {flat[metric]:.4f}")
    atomic_write_text(out / "sweep_scores.json", json.dumps(
        {"benchmark": config.eval, "param": param, "metric": metric, "scores": scores, "runs": runs}, indent=2) + "\n")
    plot_sweep(scores, out / "sweep.png", param=param, metric=str(metric), title=f"{config.eval}: {metric}")
    best = max(scores, key=lambda v: scores[v])
    print(f"best {param} = {best:g} ({metric} = {scores[best]:.4f}); plot: {out / 'sweep.png'}")
    return scores
