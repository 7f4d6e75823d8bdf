"""Key mapping between the release's merged state dict and ours, per component, both directions.

A `Rule` ties release tensors to our tensors with a pair of inverse functions; most rules are plain
renames, the rest reshape exactly (no arithmetic, so conversions are bit-identical both ways):

- LLM: `tok_embeddings`, `layers.i.attention.w{q,k,v,o}`, `feed_forward.w{1,2,3}`, norms, `output`
  -> transformers LLaMA / Mixtral under `language_model.`; q/k rows permuted per head (Meta's interleaved
  RoPE pairs -> rotate-half).
- Mixtral experts: `feed_forward.w1`, `w3`, `w2` ([E * H, D] each) -> `mlp.experts.gate_up_proj`
  [E, 2H, D] (gate rows first) and `mlp.experts.down_proj` [E, D, H].
- glue: `visual_proj`, `qformer_proj`, `start_img`, `end_img` -> `fusion.projections.*`, `fusion.*_img`.
- CLIP (open_clip `clip.visual.*`) -> `CLIPVisionModel`; the fused `attn.in_proj_*` split into q/k/v.
- ConvNeXt (timm `stem`, `stages.s.{downsample,blocks}`, `head.norm`) -> `ConvNextModel` (its
  `layernorm` holds the head norm).
- DINOv2 (hub `cls_token`, `pos_embed`, `blocks.i.*`, `norm`) -> `Dinov2Model`; `attn.qkv` -> q/k/v,
  SwiGLU `mlp.w12` -> gate / up halves, `mlp.w3` -> down.
- BLIP-2 (`qformer.*`, already the transformers layout) -> `Blip2QFormerEncoder`, renamed only.

The CLIP text-tower leftovers of the release (`clip.token_embedding`, `clip.positional_embedding`,
`clip.ln_final`, `clip.text_projection`, `clip.logit_scale`, any `clip.transformer.*`) and the unused
`clip.visual.proj` are dropped on purpose (`is_known_leftover`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from sphinx_mllm.config import EncoderSpec, SphinxConfig
from sphinx_mllm.formats.release import PREFIX
from sphinx_mllm.utils.errors import SphinxError

Tensors = Sequence[torch.Tensor]
Transform = Callable[[Tensors], list[torch.Tensor]]


def _identity(tensors: Tensors) -> list[torch.Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class Rule:
    """Release tensors `release` <-> our tensors `ours`; `to_ours` and `to_release` are exact inverses."""

    release: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Transform = field(default=_identity, repr=False)
    to_release: Transform = field(default=_identity, repr=False)


def rename(release: str, ours: str) -> Rule:
    return Rule((release,), (ours,))


def fused(release: str, ours: Sequence[str], dim: int = 0) -> Rule:
    """One release tensor = our tensors concatenated on `dim` in order (equal parts)."""
    n = len(ours)
    return Rule((release,), tuple(ours),
                to_ours=lambda t: list(torch.chunk(t[0], n, dim=dim)),
                to_release=lambda t: [torch.cat(list(t), dim=dim)])


# ---- LLM -------------------------------------------------------------------------------------------
def meta_to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows from Meta's interleaved RoPE pairs (0,1),(2,3).. to rotate-half (i, i + hd/2)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _permuted(release: str, ours: str, heads: int) -> Rule:
    return Rule((release,), (ours,),
                to_ours=lambda t: [meta_to_rotate_half(t[0], heads)],
                to_release=lambda t: [rotate_half_to_meta(t[0], heads)])


def _moe_experts(release_ffn: str, ours_mlp: str, experts: int) -> Rule:
    """w1, w2, w3 ([E * H, D] each; the release computes silu(x w1^T) * (x w3^T) @ w2 per expert)
    <-> gate_up_proj [E, 2H, D] (gate rows first) and down_proj [E, D, H]."""

    def to_ours(t: Tensors) -> list[torch.Tensor]:
        w1, w2, w3 = (x.reshape(experts, -1, x.shape[-1]) for x in t)  # [E, H, D]
        return [torch.cat([w1, w3], dim=1), w2.transpose(1, 2)]

    def to_release(t: Tensors) -> list[torch.Tensor]:
        gate_up, down = t
        hidden = down.shape[-1]
        w1, w3 = gate_up[:, :hidden], gate_up[:, hidden:]
        w2 = down.transpose(1, 2)
        return [x.reshape(-1, x.shape[-1]) for x in (w1, w2, w3)]

    return Rule(tuple(f"{release_ffn}.w{i}" for i in (1, 2, 3)),
                (f"{ours_mlp}.experts.gate_up_proj", f"{ours_mlp}.experts.down_proj"), to_ours, to_release)


def llm_rules(config: SphinxConfig) -> list[Rule]:
    tc = config.text_config
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads or tc.num_attention_heads
    moe = tc.model_type == "mixtral"
    p, o = f"{PREFIX}", "language_model.model."
    rules = [rename(f"{p}tok_embeddings.weight", f"{o}embed_tokens.weight"),
             rename(f"{p}norm.weight", f"{o}norm.weight"),
             rename(f"{p}output.weight", "language_model.lm_head.weight")]
    for i in range(tc.num_hidden_layers):
        rl, ol = f"{p}layers.{i}.", f"{o}layers.{i}."
        rules += [
            _permuted(f"{rl}attention.wq.weight", f"{ol}self_attn.q_proj.weight", heads),
            _permuted(f"{rl}attention.wk.weight", f"{ol}self_attn.k_proj.weight", kv_heads),
            rename(f"{rl}attention.wv.weight", f"{ol}self_attn.v_proj.weight"),
            rename(f"{rl}attention.wo.weight", f"{ol}self_attn.o_proj.weight"),
            rename(f"{rl}attention_norm.weight", f"{ol}input_layernorm.weight"),
            rename(f"{rl}ffn_norm.weight", f"{ol}post_attention_layernorm.weight"),
        ]
        if moe:
            rules += [rename(f"{rl}feed_forward.gate.weight", f"{ol}mlp.gate.weight"),
                      _moe_experts(f"{rl}feed_forward", f"{ol}mlp", tc.num_local_experts)]
        else:
            rules += [rename(f"{rl}feed_forward.w{r}.weight", f"{ol}mlp.{n}_proj.weight")
                      for r, n in ((1, "gate"), (2, "down"), (3, "up"))]
    return rules


def glue_rules(config: SphinxConfig) -> list[Rule]:
    rules = [rename(f"{PREFIX}start_img", "fusion.start_img"), rename(f"{PREFIX}end_img", "fusion.end_img")]
    for group in config.fusion_groups:
        rules += [rename(f"{PREFIX}{group.name}.{i}.{w}", f"fusion.projections.{group.name}.{i}.{w}")
                  for i in (0, 1) for w in ("weight", "bias")]
    return rules


# ---- encoders --------------------------------------------------------------------------------------
_W = ("weight", "bias")


def _wb(release: str, ours: str) -> list[Rule]:
    return [rename(f"{release}.{w}", f"{ours}.{w}") for w in _W]


def clip_rules(spec: EncoderSpec, rp: str, op: str) -> list[Rule]:
    """open_clip VisionTransformer (`clip.visual.`) <-> CLIPVisionModel."""
    rv, m = f"{rp}visual.", f"{op}model."
    rules = [rename(f"{rv}class_embedding", f"{m}embeddings.class_embedding"),
             rename(f"{rv}positional_embedding", f"{m}embeddings.position_embedding.weight"),
             rename(f"{rv}conv1.weight", f"{m}embeddings.patch_embedding.weight"),
             *_wb(f"{rv}ln_pre", f"{m}pre_layrnorm"), *_wb(f"{rv}ln_post", f"{m}post_layernorm")]
    for i in range(int(spec.config["num_hidden_layers"])):
        rb, ob = f"{rv}transformer.resblocks.{i}.", f"{m}encoder.layers.{i}."
        rules += [
            fused(f"{rb}attn.in_proj_weight", [f"{ob}self_attn.{x}_proj.weight" for x in "qkv"]),
            fused(f"{rb}attn.in_proj_bias", [f"{ob}self_attn.{x}_proj.bias" for x in "qkv"]),
            *_wb(f"{rb}attn.out_proj", f"{ob}self_attn.out_proj"), *_wb(f"{rb}ln_1", f"{ob}layer_norm1"),
            *_wb(f"{rb}ln_2", f"{ob}layer_norm2"), *_wb(f"{rb}mlp.c_fc", f"{ob}mlp.fc1"),
            *_wb(f"{rb}mlp.c_proj", f"{ob}mlp.fc2"),
        ]
    return rules


def convnext_rules(spec: EncoderSpec, rp: str, op: str) -> list[Rule]:
    """timm ConvNeXt trunk <-> ConvNextModel (its `layernorm` holds the head norm)."""
    m = f"{op}model."
    rules = [*_wb(f"{rp}stem.0", f"{m}embeddings.patch_embeddings"), *_wb(f"{rp}stem.1", f"{m}embeddings.layernorm"),
             *_wb(f"{rp}head.norm", f"{m}layernorm")]
    for s, depth in enumerate(spec.config["depths"]):
        rs, os_ = f"{rp}stages.{s}.", f"{m}encoder.stages.{s}."
        if s > 0:
            rules += [*_wb(f"{rs}downsample.0", f"{os_}downsampling_layer.0"),
                      *_wb(f"{rs}downsample.1", f"{os_}downsampling_layer.1")]
        for b in range(int(depth)):
            rb, ob = f"{rs}blocks.{b}.", f"{os_}layers.{b}."
            rules += [rename(f"{rb}gamma", f"{ob}layer_scale_parameter"), *_wb(f"{rb}conv_dw", f"{ob}dwconv"),
                      *_wb(f"{rb}norm", f"{ob}layernorm"), *_wb(f"{rb}mlp.fc1", f"{ob}pwconv1"),
                      *_wb(f"{rb}mlp.fc2", f"{ob}pwconv2")]
    return rules


def dinov2_rules(spec: EncoderSpec, rp: str, op: str) -> list[Rule]:
    """DINOv2 hub DinoVisionTransformer <-> Dinov2Model (SwiGLU `w12` = [gate; up] rows)."""
    m = f"{op}model."
    e = f"{m}embeddings."
    rules = [rename(f"{rp}cls_token", f"{e}cls_token"), rename(f"{rp}pos_embed", f"{e}position_embeddings"),
             rename(f"{rp}mask_token", f"{e}mask_token"),
             *_wb(f"{rp}patch_embed.proj", f"{e}patch_embeddings.projection"), *_wb(f"{rp}norm", f"{m}layernorm")]
    for i in range(int(spec.config["num_hidden_layers"])):
        rb, ob = f"{rp}blocks.{i}.", f"{m}encoder.layer.{i}."
        rules += [
            *_wb(f"{rb}norm1", f"{ob}norm1"), *_wb(f"{rb}norm2", f"{ob}norm2"),
            *(fused(f"{rb}attn.qkv.{w}", [f"{ob}attention.{x}_proj.{w}" for x in "qkv"]) for w in _W),
            *_wb(f"{rb}attn.proj", f"{ob}attention.o_proj"),
            rename(f"{rb}ls1.gamma", f"{ob}layer_scale1.lambda1"),
            rename(f"{rb}ls2.gamma", f"{ob}layer_scale2.lambda1"),
            *(fused(f"{rb}mlp.w12.{w}", [f"{ob}mlp.gate_proj.{w}", f"{ob}mlp.up_proj.{w}"]) for w in _W),
            *_wb(f"{rb}mlp.w3", f"{ob}mlp.down_proj"),
        ]
    return rules


def blip2_rules(our_keys: Iterable[str], rp: str, op: str) -> list[Rule]:
    """BLIP-2 is stored in transformers' Blip2Model layout already: every key is a rename."""
    return [rename(rp + k[len(op):], k) for k in our_keys if k.startswith(op)]


def encoder_rules(spec: EncoderSpec, our_keys: Iterable[str]) -> list[Rule]:
    rp, op = f"{PREFIX}{spec.name}.", f"vision.encoders.{spec.name}."
    if spec.family == "clip_vit":
        return clip_rules(spec, rp, op)
    if spec.family == "convnext":
        return convnext_rules(spec, rp, op)
    if spec.family == "dinov2":
        return dinov2_rules(spec, rp, op)
    return blip2_rules(our_keys, rp, op)


# ---- the whole model --------------------------------------------------------------------------------
def build_plan(config: SphinxConfig, our_keys: Sequence[str]) -> list[Rule]:
    """Every rule of a model; checks that the rules cover each of `our_keys` (the model's state-dict keys)
    exactly once, so a transformers layout change fails loudly instead of loading half a model."""
    rules = llm_rules(config) + glue_rules(config)
    for spec in config.encoder_specs:
        rules += encoder_rules(spec, our_keys)
    covered = [k for r in rules for k in r.ours]
    ours = set(our_keys)
    stray = sorted(set(covered) - ours)
    uncovered = sorted(ours - set(covered))
    doubled = sorted({k for k in covered if covered.count(k) > 1}) if len(covered) != len(set(covered)) else []
    if stray or uncovered or doubled:
        raise SphinxError(f"the release key map does not fit this model (transformers layout changed?): "
                          f"mapped keys the model lacks {stray[:10]}, model keys without a mapping {uncovered[:10]}, "
                          f"keys mapped twice {doubled[:10]}")
    return rules


_CLIP_TEXT_LEFTOVERS = re.compile(
    r"^llma\.clip\.(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale"
    r"|transformer\..*|visual\.proj|attn_mask)$"
)


def is_known_leftover(key: str) -> bool:
    """Release tensors dropped on purpose: the CLIP text tower and the unused CLIP visual projection."""
    return bool(_CLIP_TEXT_LEFTOVERS.match(key))


__all__ = [
    "Rule", "blip2_rules", "build_plan", "clip_rules", "convnext_rules", "dinov2_rules", "encoder_rules", "fused",
    "glue_rules", "is_known_leftover", "llm_rules", "meta_to_rotate_half", "rename", "rotate_half_to_meta",
]
