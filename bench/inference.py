"""Inference: time to first token (encoding of every view + prefill) and decode tokens/s at batch 1 and 8, ours
(`SphinxForConditionalGeneration.generate`) against transformers' `LlavaNextForConditionalGeneration` built with
the same LLM and a CLIP tower whose any-res tiling yields about the same number of image tokens, same dtype
(bf16), same threads, random weights, greedy decoding of a fixed number of tokens, runs interleaved.

Rows: the `debug` (1 view) and `debug-1k` (5 views) presets, the `debug` preset cut to its CLIP encoder alone
(a like-for-like row: one tower against the peer's one tower, where SPHINX's mixture runs four), and the same
four encoders under a ~1.1B-parameter LLM (TinyLlama's shape, a preset override). Fractions of the
machine's limits: prefill = counted FLOPs (torch's FlopCounterMode over one prefill forward, vision included) /
(TTFT x bf16 peak); decode = the per-step lower bound max(weight + KV-cache bytes / memory bandwidth, FLOPs /
peak) / the measured step time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)

from bench.common import BenchContext, LoadMonitor, command_line, interleaved, limits, main_for, table

NAME = "inference"
PROMPT_TOKENS = 16  # text tokens after the image
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    """One model size: our preset (+ LLM override) and the peer's tiling that matches its image tokens."""

    name: str
    preset: str
    llm: str  # "preset" (the preset's own small LLM) or "1b" (TinyLlama-1.1B shape)
    batches: tuple[int, ...]
    new_tokens: int
    peer_tile: int  # the peer CLIP's image side (patch 14): tokens per tile = (tile / 14)^2
    peer_grid: int  # any-res grid of tiles per side (the peer adds the base tile and a newline per row)
    encoders: tuple[str, ...] = ()  # keep only these of the preset's encoders (empty: all of them)


CASES = (
    Case("small 1-view", "debug", "preset", (1, 8), 64, peer_tile=154, peer_grid=1),
    Case("small 1-view, 1 encoder", "debug", "preset", (1, 8), 64, peer_tile=154, peer_grid=1, encoders=("clip",)),
    Case("small 5-view", "debug-1k", "preset", (1, 8), 64, peer_tile=224, peer_grid=2),
    Case("1.1B 1-view", "debug", "1b", (1, 8), 24, peer_tile=154, peer_grid=1),
)
SMOKE_CASES = (Case("small 1-view", "debug", "preset", (1, 2), 4, peer_tile=154, peer_grid=1),)


def tinyllama_text_config() -> dict[str, Any]:
    """The LLM of the sphinx-tiny presets (TinyLlama-1.1B's shape)."""
    from sphinx_mllm.config import PRESETS

    return copy.deepcopy(PRESETS["sphinx-tiny"]["text_config"])


def build_ours(case: Case) -> Any:
    from sphinx_mllm.config import SphinxConfig
    from sphinx_mllm.modeling import SphinxForConditionalGeneration

    overrides: dict[str, Any] = {"text_config": tinyllama_text_config()} if case.llm == "1b" else {}
    if case.encoders:
        overrides.update(encoder_subset(case.preset, case.encoders))
    config = SphinxConfig.from_preset(case.preset, **overrides)
    torch.manual_seed(0)
    with _default_dtype(DTYPE):
        model = SphinxForConditionalGeneration(config)
    return model.to(DTYPE).eval()


def encoder_subset(preset: str, keep: tuple[str, ...]) -> dict[str, Any]:
    """Preset overrides that keep only the encoders `keep` (and their fusion groups, cut to them)."""
    from sphinx_mllm.config import PRESETS, FusionGroup

    encoders = [e for e in PRESETS[preset]["encoders"] if e.name in keep]
    fusion = [FusionGroup(g.name, tuple(n for n in g.encoders if n in keep), g.grid)
              for g in PRESETS[preset]["fusion"] if any(n in keep for n in g.encoders)]
    if len(encoders) != len(keep):
        raise ValueError(f"preset {preset!r} lacks some of the encoders {keep}")
    return {"encoders": encoders, "fusion": fusion}


def build_peer(case: Case, ours: Any) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT with our LLM's config; the LLM weights are shared with ours (same tensors, no copy)."""
    text = ours.config.text_config.to_dict()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=case.peer_tile, patch_size=14, hidden_act="quick_gelu", projection_dim=32)
    side = case.peer_tile * case.peer_grid
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=ours.config.image_token_id,
                             image_grid_pinpoints=[[side, side]], tie_word_embeddings=False)
    with torch.device("meta"):
        peer = LlavaNextForConditionalGeneration(config)
    peer.model.language_model = ours.language_model.model  # the same modules: weights, buffers, RoPE tables
    peer.lm_head = ours.language_model.lm_head
    torch.manual_seed(1)
    for module in (peer.model.vision_tower, peer.model.multi_modal_projector):
        module.to_empty(device="cpu")
        for name, param in module.named_parameters():
            with torch.no_grad():
                if "norm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02)
        for name, buf in module.named_buffers():
            if "position_ids" in name:
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    peer.model.image_newline = torch.nn.Parameter(torch.randn(text["hidden_size"]) * 0.02)
    return peer.to(DTYPE).eval()


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.old = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.old)


def peer_image_tokens(case: Case) -> int:
    g = case.peer_tile // 14
    return g * g + (case.peer_grid * g) * (case.peer_grid * g + 1)  # base tile + tiles with a newline per row


def _ids(batch: int, image_tokens: int, image_id: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (batch, PROMPT_TOKENS), generator=gen)
    head = torch.tensor([[1] + [image_id] * image_tokens]).expand(batch, -1)
    return torch.cat([head, text], dim=1)


def inputs_ours(model: Any, batch: int) -> dict[str, torch.Tensor]:
    size = model.config.image_size
    ids = _ids(batch, model.config.num_image_tokens, model.config.image_token_id)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DTYPE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def inputs_peer(case: Case, model: LlavaNextForConditionalGeneration, batch: int) -> dict[str, torch.Tensor]:
    ids = _ids(batch, peer_image_tokens(case), model.config.image_token_id)
    tiles = 1 + case.peer_grid * case.peer_grid
    side = case.peer_tile * case.peer_grid
    pixels = torch.randn(batch, tiles, 3, case.peer_tile, case.peer_tile,
                         generator=torch.Generator().manual_seed(1)).to(DTYPE)
    sizes = torch.tensor([[side, side]] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}


class StepClock(StoppingCriteria):
    """Records the time each generated token (for the whole batch) becomes available; never stops."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def timed_generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> dict[str, float]:
    """-> {"ttft_s", "decode_step_s"}: first token after the call, then the median gap between tokens."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=2, eos_token_id=2, stopping_criteria=StoppingCriteriaList([clock]))
    produced = out.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, got {produced} ({len(clock.times)} steps)")
    gaps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
    step = gaps[len(gaps) // 2] if gaps else float("nan")
    return {"ttft_s": clock.times[0] - start, "decode_step_s": step,
            "decode_total_s": clock.times[-1] - clock.times[0]}


def prefill_flops(model: Any, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one prefill forward (vision + fusion + LLM, logits of the last position only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs, logits_to_keep=1, use_cache=True)
    return int(counter.get_total_flops())


def llm_decode_bytes(model: Any, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes read per decode step: every LLM weight but the input embedding, whose B rows are
    negligible; KV-cache bytes read per step at `context` tokens)."""
    lm = model.language_model
    params = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = tc.num_key_value_heads or tc.num_attention_heads
    kv = tc.num_hidden_layers * 2 * kv_heads * head_dim * 2 * context * batch
    return params, kv


def decode_step_flops(model: Any, batch: int) -> int:
    lm = model.language_model
    return 2 * batch * sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)


def ttft_breakdown(ours: Any, peer: Any, ins_o: dict[str, torch.Tensor], ins_p: dict[str, torch.Tensor],
                   reps: int) -> dict[str, dict[str, float]]:
    """Where the time to first token goes (ms, medians): each of our encoders, the fusion, the LLM prefill;
    the peer's vision tower + projector + packing, its LLM prefill. Same inputs as the timed runs."""
    from sphinx_mllm.processing.views import make_views

    px = ins_o["pixel_values"]
    parts: dict[str, Any] = {}
    for name, enc in ours.vision.encoders.items():
        views = make_views(px, enc.spec.view_size, ours.vision.view_grid).flatten(0, 1)
        parts[f"ours: encoder {name}"] = lambda enc=enc, views=views: enc(views)
    feats = ours.vision(px)
    parts["ours: fusion"] = lambda: ours.fusion(feats)
    embeds = ours.embed_inputs(ins_o["input_ids"], px)
    parts["ours: LLM prefill"] = lambda: ours.language_model(
        inputs_embeds=embeds, attention_mask=ins_o["attention_mask"], logits_to_keep=1, use_cache=True)
    parts["ours: whole prefill"] = lambda: ours(**ins_o, logits_to_keep=1, use_cache=True)
    parts["peer: vision + projector"] = lambda: peer.model.get_image_features(ins_p["pixel_values"],
                                                                               ins_p["image_sizes"])
    p_embeds = peer.model.get_input_embeddings()(ins_p["input_ids"])
    p_feats = torch.cat(list(peer.model.get_image_features(ins_p["pixel_values"], ins_p["image_sizes"]).pooler_output))
    mask = (ins_p["input_ids"] == peer.config.image_token_id).unsqueeze(-1)
    p_embeds = p_embeds.masked_scatter(mask, p_feats.to(p_embeds.dtype))
    parts["peer: LLM prefill"] = lambda: ours.language_model(  # the same LLM modules as the peer's
        inputs_embeds=p_embeds, attention_mask=ins_p["attention_mask"], logits_to_keep=1, use_cache=True)
    parts["peer: whole prefill"] = lambda: peer(**ins_p, logits_to_keep=1, use_cache=True)
    with torch.inference_mode():
        timings = interleaved(parts, warmup=1, repeats=reps)
    return {name: {"ms": t.median * 1e3} for name, t in timings.items()}


def measure_case(ctx: BenchContext, case: Case, lim: dict[str, Any],
                 profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ours = build_ours(case)
    peer = build_peer(case, ours)
    reps = ctx.reps(full=5 if case.llm == "preset" else 3, smoke=1)  # small rows are cheap: more repeats
    flops_b1 = {"ours": prefill_flops(ours, inputs_ours(ours, 1)),
                "peer": prefill_flops(peer, inputs_peer(case, peer, 1))}
    rows = []
    for batch in case.batches:
        ins_o, ins_p = inputs_ours(ours, batch), inputs_peer(case, peer, batch)
        samples: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}
        ctx.settle()
        monitor = LoadMonitor()

        def once(who: str, model: Any, ins: dict[str, torch.Tensor], samples: dict = samples) -> None:
            samples[who].append(timed_generate(model, ins, case.new_tokens))

        interleaved({"ours": lambda ins_o=ins_o: once("ours", ours, ins_o),
                     "peer": lambda ins_p=ins_p: once("peer", peer, ins_p)},
                    warmup=0 if ctx.smoke else 1, repeats=reps)
        load = monitor.foreign_cores()
        for who, ins in (("ours", ins_o), ("peer", ins_p)):
            got = samples[who][-reps:]
            ttft = sorted(s["ttft_s"] for s in got)[len(got) // 2]
            step = sorted(s["decode_step_s"] for s in got)[len(got) // 2]
            flops = flops_b1[who] * batch  # identical rows: prefill FLOPs scale with the batch exactly
            context = ins["input_ids"].shape[1] + case.new_tokens // 2
            w_bytes, kv_bytes = llm_decode_bytes(ours, batch, context)
            bound = max((w_bytes + kv_bytes) / (lim["mem_gbps"] * 1e9),
                        decode_step_flops(ours, batch) / (lim["bf16_gflops"] * 1e9))
            rows.append({
                "case": case.name, "batch": batch, "model": who,
                "image_tokens": (ours.config.num_image_tokens if who == "ours" else peer_image_tokens(case)),
                "prompt_tokens": int(ins["input_ids"].shape[1]),
                "ttft_ms": ttft * 1e3, "prefill_tflop": flops / 1e12,
                "prefill_frac_peak": flops / ttft / (lim["bf16_gflops"] * 1e9),
                "decode_tok_s": batch / step, "decode_step_ms": step * 1e3,
                "decode_bound_ms": bound * 1e3, "decode_frac_limit": bound / step,
                "weight_gb": w_bytes / 1e9, "foreign_load_cores": load,
                "ttft_values_ms": [s["ttft_s"] * 1e3 for s in got],
                "decode_step_values_ms": [s["decode_step_s"] * 1e3 for s in got],
            })
        if batch == 1 or case.llm == "preset":  # the 1B batch-8 prefill is long: its breakdown adds little
            profiles.append({"case": case.name, "batch": batch,
                             "parts": ttft_breakdown(ours, peer, ins_o, ins_p, max(3, reps))})
        ours_row, peer_row = rows[-2], rows[-1]
        ours_row["ttft_vs_peer"] = peer_row["ttft_ms"] / ours_row["ttft_ms"]
        ours_row["decode_vs_peer"] = ours_row["decode_tok_s"] / peer_row["decode_tok_s"]
    llm_params = sum(p.numel() for p in ours.language_model.parameters())
    for row in rows:
        row["llm_params_m"] = llm_params / 1e6
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # rows are chosen with --only "small 1-view" ...


def run(ctx: BenchContext) -> dict[str, Any]:
    lim = limits(ctx)
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    for case in SMOKE_CASES if ctx.smoke else CASES:
        if ctx.wanted(case.name):
            rows += measure_case(ctx, case, lim, profiles)
            gc.collect()  # the case's models are gone: free their memory before the next
    cols = ["case", "batch", "model", "image_tokens", "ttft_ms", "prefill_frac_peak", "decode_tok_s",
            "decode_frac_limit", "ttft_vs_peer", "decode_vs_peer"]
    title = (f"Inference, bf16, {ctx.threads} threads (peer: LlavaNextForConditionalGeneration; ratios > 1: "
             "ours faster)")
    names = list(dict.fromkeys(n for p in profiles for n in p["parts"]))
    prof_rows = [{"part": n, **{f"{p['case']} b{p['batch']}": p["parts"][n]["ms"] for p in profiles if n in p["parts"]}}
                 for n in names]
    prof_cols = ["part"] + [f"{p['case']} b{p['batch']}" for p in profiles]
    tables = table(title, rows, cols) + "\n" + table("Time to first token, by part (ms, medians)", prof_rows, prof_cols)
    return {"rows": rows, "profiles": profiles, "limits_used": lim, "tables": tables}


def command(ctx: BenchContext) -> str:
    return command_line("bench.inference", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))
