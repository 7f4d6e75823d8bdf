"""Numerical parity with the release: an independent forward of SPHINX written here in the release's own
layout (Meta LLaMA / MoE with complex RoPE, open_clip ViT, timm ConvNeXt, DINOv2 hub ViT with its
position-table interpolation, BLIP-2 through transformers' Blip2Model as the release does, the release's
fusion and view order), run on a random release-layout state dict that is saved as 1, 2 and 4
tensor-parallel shards in the real file layout, then loaded by `from_pretrained` and compared at 1e-5 (fp32).

Nothing here imports our key map: keys, shapes, shard splitting and the math are written from the
release's code (accessory/model/LLM/llama_ens*.py, mixtral_sparse_ens*.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sphinx_mllm import SphinxForConditionalGeneration  # the public import also registers the release reader
from sphinx_mllm.config import SphinxConfig

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
DINO_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
DINO_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
LLAMA_TYPES = {"debug": "llama_ens", "debug-1k": "llama_ens5", "debug-moe": "mixtral_sparse_ens"}


# =====================================================================================================
# A random state dict in the release's layout (tiny sizes of our debug presets)
# =====================================================================================================
class _Init:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape: int) -> torch.Tensor:  # weight, fan-in scaled
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=self.g) / math.sqrt(fan_in)

    def b(self, *shape: int, scale: float = 0.1) -> torch.Tensor:  # bias / free vectors
        return torch.randn(*shape, generator=self.g) * scale

    def norm(self, n: int) -> torch.Tensor:  # norm gains near 1
        return 1.0 + 0.1 * torch.randn(n, generator=self.g)


def _llm_state(cfg: SphinxConfig, init: _Init) -> dict[str, torch.Tensor]:
    tc = cfg.text_config
    d, v, f = tc.hidden_size, tc.vocab_size, tc.intermediate_size
    hd = d // tc.num_attention_heads
    sd = {"tok_embeddings.weight": init.b(v, d, scale=1.0), "norm.weight": init.norm(d), "output.weight": init.w(v, d)}
    for i in range(tc.num_hidden_layers):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": init.w(tc.num_attention_heads * hd, d),
                   p + "attention.wk.weight": init.w(tc.num_key_value_heads * hd, d),
                   p + "attention.wv.weight": init.w(tc.num_key_value_heads * hd, d),
                   p + "attention.wo.weight": init.w(d, tc.num_attention_heads * hd),
                   p + "attention_norm.weight": init.norm(d), p + "ffn_norm.weight": init.norm(d)})
        if tc.model_type == "mixtral":
            e = tc.num_local_experts
            sd[p + "feed_forward.gate.weight"] = init.w(e, d) * 4  # peaked routing
            sd.update({p + f"feed_forward.w{n}": init.w(e * f, d) for n in (1, 3)})
            sd[p + "feed_forward.w2"] = init.b(e * f, d, scale=1 / math.sqrt(f))  # [E*F, D], used as h @ w2_e
        else:
            sd.update({p + "feed_forward.w1.weight": init.w(f, d), p + "feed_forward.w2.weight": init.w(d, f),
                       p + "feed_forward.w3.weight": init.w(f, d)})
    return sd


def _clip_state(c: dict, init: _Init) -> dict[str, torch.Tensor]:
    w, inter, grid = c["hidden_size"], c["intermediate_size"], c["image_size"] // c["patch_size"]
    sd = {"visual.class_embedding": init.b(w, scale=0.5),
          "visual.positional_embedding": init.b(grid**2 + 1, w, scale=0.5),
          "visual.conv1.weight": init.w(w, 3, c["patch_size"], c["patch_size"]), "visual.proj": init.w(w, 16),
          "visual.ln_pre.weight": init.norm(w), "visual.ln_pre.bias": init.b(w),
          "visual.ln_post.weight": init.norm(w), "visual.ln_post.bias": init.b(w),
          # text-tower leftovers the release carries (dropped on load)
          "token_embedding.weight": init.b(100, 16), "positional_embedding": init.b(77, 16),
          "ln_final.weight": init.norm(16), "ln_final.bias": init.b(16), "text_projection": init.w(16, 16),
          "logit_scale": torch.tensor(4.6)}
    for i in range(c["num_hidden_layers"]):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": init.norm(w), p + "ln_1.bias": init.b(w),
                   p + "attn.in_proj_weight": init.w(3 * w, w), p + "attn.in_proj_bias": init.b(3 * w),
                   p + "attn.out_proj.weight": init.w(w, w), p + "attn.out_proj.bias": init.b(w),
                   p + "ln_2.weight": init.norm(w), p + "ln_2.bias": init.b(w),
                   p + "mlp.c_fc.weight": init.w(inter, w), p + "mlp.c_fc.bias": init.b(inter),
                   p + "mlp.c_proj.weight": init.w(w, inter), p + "mlp.c_proj.bias": init.b(w)})
    return sd


def _convnext_state(c: dict, init: _Init) -> dict[str, torch.Tensor]:
    dims = c["hidden_sizes"]
    sd = {"stem.0.weight": init.w(dims[0], 3, 4, 4), "stem.0.bias": init.b(dims[0]),
          "stem.1.weight": init.norm(dims[0]), "stem.1.bias": init.b(dims[0]),
          "head.norm.weight": init.norm(dims[-1]), "head.norm.bias": init.b(dims[-1])}
    for s, (dim, depth) in enumerate(zip(dims, c["depths"])):
        p = f"stages.{s}."
        if s:
            sd.update({p + "downsample.0.weight": init.norm(dims[s - 1]), p + "downsample.0.bias": init.b(dims[s - 1]),
                       p + "downsample.1.weight": init.w(dim, dims[s - 1], 2, 2), p + "downsample.1.bias": init.b(dim)})
        for b in range(depth):
            q = f"{p}blocks.{b}."
            sd.update({q + "gamma": 0.5 + init.b(dim), q + "conv_dw.weight": init.w(dim, 1, 7, 7),
                       q + "conv_dw.bias": init.b(dim), q + "norm.weight": init.norm(dim), q + "norm.bias": init.b(dim),
                       q + "mlp.fc1.weight": init.w(4 * dim, dim), q + "mlp.fc1.bias": init.b(4 * dim),
                       q + "mlp.fc2.weight": init.w(dim, 4 * dim), q + "mlp.fc2.bias": init.b(dim)})
    return sd


def _dinov2_state(c: dict, init: _Init) -> dict[str, torch.Tensor]:
    w = c["hidden_size"]
    hidden = (int(w * c["mlp_ratio"] * 2 / 3) + 7) // 8 * 8  # the hub's SwiGLUFFNFused size
    side = c["image_size"] // c["patch_size"]
    sd = {"cls_token": init.b(1, 1, w, scale=0.5), "pos_embed": init.b(1, side * side + 1, w, scale=0.5),
          "mask_token": init.b(1, w), "patch_embed.proj.weight": init.w(w, 3, c["patch_size"], c["patch_size"]),
          "patch_embed.proj.bias": init.b(w), "norm.weight": init.norm(w), "norm.bias": init.b(w)}
    for i in range(c["num_hidden_layers"]):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": init.norm(w), p + "norm1.bias": init.b(w),
                   p + "attn.qkv.weight": init.w(3 * w, w), p + "attn.qkv.bias": init.b(3 * w),
                   p + "attn.proj.weight": init.w(w, w), p + "attn.proj.bias": init.b(w),
                   p + "ls1.gamma": 0.5 + init.b(w), p + "norm2.weight": init.norm(w), p + "norm2.bias": init.b(w),
                   p + "mlp.w12.weight": init.w(2 * hidden, w), p + "mlp.w12.bias": init.b(2 * hidden),
                   p + "mlp.w3.weight": init.w(w, hidden), p + "mlp.w3.bias": init.b(w),
                   p + "ls2.gamma": 0.5 + init.b(w)})
    return sd


def _blip2_model(c: dict):
    """transformers' Blip2Model, as the release builds it (its language model is never used)."""
    from transformers import Blip2Config, Blip2Model

    text = dict(model_type="opt", vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32)
    return Blip2Model(Blip2Config(vision_config=c["vision_config"], qformer_config=c["qformer_config"],
                                  text_config=text, num_query_tokens=c["num_query_tokens"])).eval()


def _blip2_state(c: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _blip2_model(c)
    with torch.no_grad():  # make the LayerNorms non-trivial too
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "qformer.")) and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.startswith(("vision_model.", "qformer.", "query_tokens"))}


def release_state(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The merged release state dict (keys `llma.` ...) of a debug preset, random but well scaled."""
    cfg = SphinxConfig.from_preset(preset)
    init = _Init(seed)
    d = cfg.text_config.hidden_size
    sd = _llm_state(cfg, init)
    specs = {s.name: s for s in cfg.encoder_specs}
    builders = {"clip": lambda c: _clip_state(c, init), "openclip_convnext_xxl": lambda c: _convnext_state(c, init),
                "dinov2_vitg14": lambda c: _dinov2_state(c, init), "qformer": lambda c: _blip2_state(c, seed)}
    for name, build in builders.items():
        sd.update({f"{name}.{k}": v for k, v in build(specs[name].config).items()})
    widths = {"qformer_proj": specs["qformer"].width,
              "visual_proj": sum(specs[n].width for n in ("clip", "openclip_convnext_xxl", "dinov2_vitg14"))}
    for proj, width in widths.items():
        sd.update({f"{proj}.0.weight": init.w(d, width), f"{proj}.0.bias": init.b(d),
                   f"{proj}.1.weight": init.norm(d), f"{proj}.1.bias": init.b(d)})
    sd.update({"start_img": init.b(1, 1, d, scale=1.0), "end_img": init.b(1, 1, d, scale=1.0)})
    return {f"llma.{k}": v for k, v in sd.items()}


# =====================================================================================================
# The release's file layout: tensor-parallel shards
# =====================================================================================================
def tp_pieces(key: str, t: torch.Tensor, n: int, experts: int) -> list[torch.Tensor]:
    """Split like fairscale's parallel layers and the MoE's `_sparse_expert_split`."""
    name = key.removeprefix("llma.")
    if name == "tok_embeddings.weight":
        return list(t.chunk(n, dim=1))  # ParallelEmbedding: model dim
    llm_layer = name.startswith("layers.")
    if name == "output.weight" or (llm_layer and name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight",
                                                                "w3.weight"))):
        return list(t.chunk(n, dim=0))  # ColumnParallelLinear
    if llm_layer and name.endswith(("wo.weight", "w2.weight")):
        return list(t.chunk(n, dim=1))  # RowParallelLinear
    if name.startswith("layers.") and name.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")):
        return [p.reshape(-1, t.shape[-1]) for p in t.view(experts, -1, t.shape[-1]).chunk(n, dim=1)]
    return [t] * n


def release_args(preset: str) -> dict:
    """The release's `config.json` (ModelArgs) for a debug preset's LLM."""
    tc = SphinxConfig.from_preset(preset).text_config
    args = {"dim": tc.hidden_size, "n_layers": tc.num_hidden_layers, "n_heads": tc.num_attention_heads,
            "n_kv_heads": tc.num_key_value_heads, "vocab_size": -1, "norm_eps": tc.rms_norm_eps,
            "rope_theta": tc.rope_parameters["rope_theta"]}
    if tc.model_type == "mixtral":
        args.update(hidden_dim=tc.intermediate_size, head_dim=tc.hidden_size // tc.num_attention_heads,
                    moe={"num_experts": tc.num_local_experts, "num_experts_per_tok": tc.num_experts_per_tok})
    return args


def write_release(folder: Path, preset: str, sd: dict[str, torch.Tensor], n: int, wrap: bool = True) -> Path:
    """Shards as the release saves them, plus config.json / meta.json and our sphinx_mllm.json (debug sizes)."""
    cfg = SphinxConfig.from_preset(preset)
    args = release_args(preset)
    experts = args.get("moe", {}).get("num_experts", 1)
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in sd.items():
        for rank, piece in enumerate(tp_pieces(key, t, n, experts)):
            shards[rank][key] = piece.clone()
    for rank, shard in enumerate(shards):
        torch.save({"model": shard} if wrap else shard, folder / f"consolidated.{rank:02d}-of-{n:02d}.model.pth")
    (folder / "config.json").write_text(json.dumps(args))
    (folder / "meta.json").write_text(json.dumps({"llama_type": LLAMA_TYPES[preset]}))
    (folder / "sphinx_mllm.json").write_text(cfg.to_json_string())
    return folder


# =====================================================================================================
# The reference forward, in the release's layout
# =====================================================================================================
def _ln(x: torch.Tensor, sd: dict, p: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _ln2d(x: torch.Tensor, sd: dict, p: str, eps: float) -> torch.Tensor:  # timm LayerNorm2d
    return _ln(x.permute(0, 2, 3, 1), sd, p, eps).permute(0, 3, 1, 2)


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """[B, L, C] each -> [B, L, C]; explicit softmax attention."""
    b, lq, c = q.shape
    hd = c // heads
    q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)


def ref_clip(sd: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    """open_clip VisionTransformer as `clip_encode_image`: all tokens after ln_post, no projection."""
    p = "clip.visual."
    act = {"quick_gelu": lambda t: t * torch.sigmoid(1.702 * t), "gelu": F.gelu}[c["hidden_act"]]
    x = F.conv2d(x, sd[p + "conv1.weight"], stride=c["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[p + "positional_embedding"]
    x = _ln(x, sd, p + "ln_pre", 1e-5)
    for i in range(c["num_hidden_layers"]):
        r = f"{p}transformer.resblocks.{i}."
        h = _ln(x, sd, r + "ln_1", 1e-5)
        q, k, v = F.linear(h, sd[r + "attn.in_proj_weight"], sd[r + "attn.in_proj_bias"]).chunk(3, dim=-1)
        x = x + F.linear(_mha(q, k, v, c["num_attention_heads"]), sd[r + "attn.out_proj.weight"],
                         sd[r + "attn.out_proj.bias"])
        h = act(F.linear(_ln(x, sd, r + "ln_2", 1e-5), sd[r + "mlp.c_fc.weight"], sd[r + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[r + "mlp.c_proj.weight"], sd[r + "mlp.c_proj.bias"])
    return _ln(x, sd, p + "ln_post", 1e-5)


def ref_convnext(sd: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    """timm ConvNeXt trunk (convnext_xxlarge: norm_eps 1e-5) with global_pool/flatten removed -> [N, C, g, g]."""
    p, eps = "openclip_convnext_xxl.", 1e-5
    x = _ln2d(F.conv2d(x, sd[p + "stem.0.weight"], sd[p + "stem.0.bias"], stride=4), sd, p + "stem.1", eps)
    for s, depth in enumerate(c["depths"]):
        q = f"{p}stages.{s}."
        if s:
            x = _ln2d(x, sd, q + "downsample.0", eps)
            x = F.conv2d(x, sd[q + "downsample.1.weight"], sd[q + "downsample.1.bias"], stride=2)
        for b in range(depth):
            r = f"{q}blocks.{b}."
            h = F.conv2d(x, sd[r + "conv_dw.weight"], sd[r + "conv_dw.bias"], padding=3, groups=x.shape[1])
            h = _ln(h.permute(0, 2, 3, 1), sd, r + "norm", eps)
            h = F.linear(F.gelu(F.linear(h, sd[r + "mlp.fc1.weight"], sd[r + "mlp.fc1.bias"])),
                         sd[r + "mlp.fc2.weight"], sd[r + "mlp.fc2.bias"])
            x = x + h.permute(0, 3, 1, 2) * sd[r + "gamma"].view(1, -1, 1, 1)
    return _ln2d(x, sd, p + "head.norm", eps)


def hub_interpolate_pos_encoding(pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int) -> torch.Tensor:
    """DINOv2 hub `interpolate_pos_encoding` (2023): bicubic with scale factor (w0 + 0.1) / sqrt(N)."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos = pos_embed.float()
    dim = pos.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    table = F.interpolate(pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
                          scale_factor=(float(w0 / math.sqrt(n)), float(h0 / math.sqrt(n))), mode="bicubic")
    assert (int(w0), int(h0)) == tuple(table.shape[-2:])
    return torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def ref_dinov2(sd: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    """DINOv2 hub `forward_features`: [x_norm_clstoken ; x_norm_patchtokens]."""
    p, eps, patch = "dinov2_vitg14.", 1e-6, c["patch_size"]
    _, _, w, h = x.shape
    x = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + hub_interpolate_pos_encoding(sd[p + "pos_embed"], x.shape[1] - 1, w, h, patch)
    for i in range(c["num_hidden_layers"]):
        r = f"{p}blocks.{i}."
        qkv = F.linear(_ln(x, sd, r + "norm1", eps), sd[r + "attn.qkv.weight"], sd[r + "attn.qkv.bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        a = F.linear(_mha(q, k, v, c["num_attention_heads"]), sd[r + "attn.proj.weight"], sd[r + "attn.proj.bias"])
        x = x + a * sd[r + "ls1.gamma"]
        x1, x2 = F.linear(_ln(x, sd, r + "norm2", eps), sd[r + "mlp.w12.weight"], sd[r + "mlp.w12.bias"]).chunk(2, -1)
        x = x + F.linear(F.silu(x1) * x2, sd[r + "mlp.w3.weight"], sd[r + "mlp.w3.bias"]) * sd[r + "ls2.gamma"]
    return _ln(x, sd, p + "norm", eps)


def ref_qformer(sd: dict, x: torch.Tensor, c: dict) -> torch.Tensor:
    model = _blip2_model(c)
    state = {k.removeprefix("qformer."): v for k, v in sd.items() if k.startswith("qformer.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("language") for k in missing), missing
    return model.get_qformer_features(pixel_values=x)


def _release_views(pixels: torch.Tensor, preset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(views for the 224 encoders, views for ConvNeXt), view-major as the release concatenates them."""
    if preset == "debug-1k":  # llama_ens5: bicubic 224 global + the 448 image's quadrants
        glob = F.interpolate(pixels, size=(224, 224), mode="bicubic")
        parts = [pixels[..., :224, :224], pixels[..., :224, 224:], pixels[..., 224:, :224], pixels[..., 224:, 224:]]
        v224 = torch.cat([glob, *parts], dim=0)
        return v224, F.interpolate(v224, size=(256, 256))
    if preset == "debug-moe":  # mixtral_sparse_ens: 224 bicubic for CLIP/Q-Former/DINOv2, ConvNeXt at 512
        return F.interpolate(pixels, size=(224, 224), mode="bicubic"), F.interpolate(pixels, size=(512, 512))
    return pixels, F.interpolate(pixels, size=(256, 256))  # llama_ens


def ref_image_tokens(sd: dict, pixels: torch.Tensor, preset: str) -> torch.Tensor:
    """encode_image + start/end wrapping -> [B, V * tokens_per_view, D]."""
    specs = {s.name: s.config for s in SphinxConfig.from_preset(preset).encoder_specs}
    v224, vcn = _release_views(pixels, preset)
    qf = ref_qformer(sd, v224, specs["qformer"])
    clip = ref_clip(sd, v224, specs["clip"])
    fmap = ref_convnext(sd, vcn, specs["openclip_convnext_xxl"])
    if fmap.shape[-1] == 8:
        fmap = fmap.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    cn = fmap.flatten(-2).permute(0, 2, 1)
    cn = torch.cat([cn.mean(dim=1, keepdim=True), cn], dim=1)
    dino = ref_dinov2(sd, (v224 * CLIP_STD + CLIP_MEAN - DINO_MEAN) / DINO_STD, specs["dinov2_vitg14"])
    ens = torch.cat([clip, cn, dino], dim=2)

    def proj(t: torch.Tensor, name: str) -> torch.Tensor:
        t = F.linear(t, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"])
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.1.weight"], sd[f"{name}.1.bias"], 1e-5)

    feats = torch.cat([proj(qf, "qformer_proj"), proj(ens, "visual_proj")], dim=1)  # [V*B, T, D]
    b = pixels.shape[0]
    views = []
    for view in feats.chunk(feats.shape[0] // b, dim=0):
        views.append(torch.cat([sd["start_img"].expand(b, -1, -1), view, sd["end_img"].expand(b, -1, -1)], dim=1))
    return torch.cat(views, dim=1)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's complex RoPE on adjacent pairs. x [B, L, H, hd]."""
    b, seq, h, hd = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))  # [L, hd/2]
    xc = torch.view_as_complex(x.float().reshape(b, seq, h, hd // 2, 2))
    return torch.view_as_real(xc * cis.view(1, seq, 1, hd // 2)).flatten(3)


def _moe(sd: dict, p: str, x: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """The release's MoE: softmax over experts, top-k, renormalised; expert e = silu(x w1_e^T)*(x w3_e^T) @ w2_e."""
    flat = x.reshape(-1, x.shape[-1])
    probs = F.softmax(flat @ sd[p + "gate.weight"].T, dim=-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    w1, w2, w3 = (sd[f"{p}w{n}"].view(experts, -1, flat.shape[-1]) for n in (1, 2, 3))
    out = torch.zeros_like(flat)
    for tok in range(flat.shape[0]):
        for slot in range(top_k):
            e = int(chosen[tok, slot])
            hidden = F.silu(w1[e] @ flat[tok]) * (w3[e] @ flat[tok])
            out[tok] += weights[tok, slot] * (hidden @ w2[e])
    return out.view_as(x)


def ref_llm(sd: dict, h: torch.Tensor, args: dict) -> torch.Tensor:
    """The release's Transformer over embeddings h [B, L, D] -> logits [B, L, V] (causal, RoPE from 0).
    `args`: its ModelArgs as read from config.json (rope_theta default: 1e4 LLaMA, 1e6 Mixtral)."""
    moe = "moe" in args
    heads, eps = args["n_heads"], args.get("norm_eps", 1e-5)
    kv = args.get("n_kv_heads") or heads
    theta = args.get("rope_theta", 1e6 if moe else 1e4)
    b, seq, d = h.shape
    hd = d // heads
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        x = _rmsnorm(h, sd[p + "attention_norm.weight"], eps)
        q = _rope((x @ sd[p + "attention.wq.weight"].T).view(b, seq, heads, hd), theta)
        k = _rope((x @ sd[p + "attention.wk.weight"].T).view(b, seq, kv, hd), theta)
        v = (x @ sd[p + "attention.wv.weight"].T).view(b, seq, kv, hd)
        k, v = (t.repeat_interleave(heads // kv, dim=2) for t in (k, v))  # repeat_kv
        att = _mha(q.flatten(2), k.flatten(2), v.flatten(2), heads, mask)
        h = h + att @ sd[p + "attention.wo.weight"].T
        x = _rmsnorm(h, sd[p + "ffn_norm.weight"], eps)
        if moe:
            h = h + _moe(sd, p + "feed_forward.", x, args["moe"]["num_experts"], args["moe"]["num_experts_per_tok"])
        else:
            g = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
            h = h + g @ sd[p + "feed_forward.w2.weight"].T
    return _rmsnorm(h, sd["norm.weight"], eps) @ sd["output.weight"].T


def ref_forward(release_sd: dict, text_ids: torch.Tensor, pixels: torch.Tensor | None, preset: str) -> torch.Tensor:
    """Logits for [BOS] [image tokens] [text]: the release's forward (h_bos, image tokens, h_caption)."""
    sd = {k.removeprefix("llma."): v for k, v in release_sd.items()}
    h = sd["tok_embeddings.weight"][text_ids]
    if pixels is not None:
        h = torch.cat([h[:, :1], ref_image_tokens(sd, pixels, preset), h[:, 1:]], dim=1)
    return ref_llm(sd, h, release_args(preset))


# =====================================================================================================
# Tests
# =====================================================================================================
@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    return {preset: release_state(preset, seed=i) for i, preset in enumerate(LLAMA_TYPES)}


def _compare(preset: str, sd: dict, folder: Path, with_image: bool) -> None:
    model = SphinxForConditionalGeneration.from_pretrained(folder)
    cfg = model.config
    text = torch.tensor([[1, 345, 9, 2710, 77, 5012, 13, 880], [1, 42, 4242, 31999, 7, 3, 19, 2]])
    pixels = None
    ids = text
    if with_image:
        pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))
        placeholders = torch.full((2, cfg.num_image_tokens), cfg.image_token_id)
        ids = torch.cat([text[:, :1], placeholders, text[:, 1:]], dim=1)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        ref = ref_forward(sd, text, pixels, preset)
    assert ours.shape == ref.shape == (2, ids.shape[1], cfg.text_config.vocab_size)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# Each preset once in the default run (together: 1, 2 and 4 shards); the full matrix is marked slow.
_FAST = {("debug", 2), ("debug-1k", 4), ("debug-moe", 1)}
_MATRIX = [pytest.param(p, n, marks=() if (p, n) in _FAST else pytest.mark.slow)
           for p in LLAMA_TYPES for n in (1, 2, 4)]


@pytest.mark.parametrize(("preset", "num_shards"), _MATRIX)
def test_loaded_model_matches_the_release_reference_with_images(states, tmp_path: Path, preset: str,
                                                                num_shards: int) -> None:
    folder = write_release(tmp_path / "release", preset, states[preset], num_shards, wrap=num_shards != 2)
    _compare(preset, states[preset], folder, with_image=True)


@pytest.mark.parametrize("preset", list(LLAMA_TYPES))
def test_loaded_model_matches_the_release_reference_text_only(states, tmp_path: Path, preset: str) -> None:
    folder = write_release(tmp_path / "release", preset, states[preset], 2)
    _compare(preset, states[preset], folder, with_image=False)


def test_reference_hub_interpolation_differs_from_an_exact_size_resize() -> None:
    """The reason the DINOv2 adapter resizes its position table like the hub: 37 -> 16 by scale factor
    (16.1 / 37) samples other points than resizing to exactly 16 (what transformers does)."""
    pos = torch.randn(1, 37 * 37 + 1, 8, generator=torch.Generator().manual_seed(0))
    hub = hub_interpolate_pos_encoding(pos, 256, 224, 224, 14)
    exact = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    exact = exact.permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert hub.shape == (1, 257, 8)
    assert (hub[:, 1:] - exact).abs().max() > 1e-2


@pytest.mark.parametrize("preset", ["debug-1k", "debug-moe"])
def test_release_to_ours_to_release_through_the_cli_is_bit_identical(states, tmp_path: Path, preset: str) -> None:
    """bf16 release shards -> our safetensors folder -> release shards again: every tensor the model uses comes
    back bit-identical, in the same shard; only the CLIP text-tower leftovers are dropped (on purpose)."""
    from sphinx_mllm.cli.main import main

    release = {k: v.to(torch.bfloat16) for k, v in states[preset].items()}  # the release ships bf16
    src = write_release(tmp_path / "release", preset, release, 2)
    tokenizer = Path(__file__).parent / "fixtures" / "llama_format_tokenizer.model"
    (src / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(src), str(hf)]) == 0
    assert (hf / "model.safetensors").is_file() and (hf / "processor_config.json").is_file()
    assert main(["convert", "--to", "release", str(hf), str(back), "--shards", "2"]) == 0
    leftovers = {f"llma.clip.{k}" for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                                             "ln_final.bias", "text_projection", "logit_scale", "visual.proj")}
    for rank in range(2):
        name = f"consolidated.{rank:02d}-of-02.model.pth"
        before = torch.load(src / name, weights_only=True)["model"]
        after = torch.load(back / name, weights_only=True)["model"]
        assert set(before) - set(after) == leftovers and set(after) <= set(before)
        for key, tensor in after.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, before[key]), key
    assert json.loads((back / "meta.json").read_text()) == {"llama_type": LLAMA_TYPES[preset]}
    assert (back / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    args = json.loads((back / "config.json").read_text())
    assert {k: args[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")} == {
        k: release_args(preset)[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")}
