"""`sphinx-mllm info --preset NAME [--json]`: views, image tokens and parameter counts of a preset.

The model is built on the meta device: no memory, no weights, seconds even for SPHINX-MoE.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sphinx_mllm.config import SphinxConfig, available_presets


def preset_info(name: str) -> dict[str, Any]:
    """`{"preset", "views", "num_image_tokens", "parameters": {"llm", "projector", "encoders": {...}}}`"""
    import torch

    from sphinx_mllm.modeling import SphinxForConditionalGeneration

    config = SphinxConfig.from_preset(name)
    with torch.device("meta"):
        model = SphinxForConditionalGeneration(config)
    return {
        "preset": name,
        "views": config.num_views,
        "num_image_tokens": config.num_image_tokens,
        "parameters": model.parameter_counts(),
    }


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    info = preset_info(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters"]
    total = params["llm"] + params["projector"] + sum(params["encoders"].values())
    print(f"preset                  {info['preset']}")
    print(f"views                   {info['views']}")
    print(f"image tokens            {info['num_image_tokens']}")
    print(f"parameters              {_human(total)} ({total:,})")
    print(f"  llm                   {_human(params['llm'])} ({params['llm']:,})")
    print(f"  projector             {_human(params['projector'])} ({params['projector']:,})")
    for name, count in params["encoders"].items():
        print(f"  {name:<22}{_human(count)} ({count:,})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="describe a preset: views, image tokens, parameter counts",
                            description=__doc__)
    parser.add_argument("--preset", required=True, choices=available_presets(), help="preset name")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
