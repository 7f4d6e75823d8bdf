"""SphinxConfig: one typed config tree for a SPHINX model, and the presets of every variant.

The config holds four things (SPHINX.md sections 2-4):
- the LLM: a transformers `LlamaConfig` or `MixtralConfig` (`text_config`);
- the frozen vision encoders (`encoders`): one `EncoderSpec` each, with the kwargs of the transformers
  config class of its tower and the sizes of the views it sees;
- the fusion groups (`fusion`): encoders in one group are aligned to a common token grid and concatenated
  along channels, then projected (Linear + LayerNorm); groups follow each other along the sequence;
- the view policy: the padded square of side `image_size` cut into a global view plus a
  `view_grid` x `view_grid` grid of sub-images.

`SphinxConfig.num_image_tokens` is the only place the count of image tokens per image is computed.
Variants are presets (data); `SphinxConfig.from_preset(name)` builds one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from sphinx_mllm.utils.errors import SphinxError

EncoderFamily = Literal["clip_vit", "convnext", "dinov2", "blip2_qformer"]
ENCODER_FAMILIES: tuple[str, ...] = ("clip_vit", "convnext", "dinov2", "blip2_qformer")

# Pixel statistics of the release (SPHINX.md section 5).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """One frozen vision encoder and the pixels it sees.

    Views for this encoder are cut from the processor's square at side `view_size` (global view: the
    square resized to `view_size`; sub-images: the square resized to `view_grid * view_size`, then cut).
    Each view is then resized to `input_size` with `input_resize` if the two differ (the release feeds
    ConvNeXt the 224 view resized *nearest* to 256).
    """

    name: str  # module name; also the release checkpoint prefix ("clip", "openclip_convnext_xxl", ...)
    family: EncoderFamily
    config: dict[str, Any]  # kwargs of the transformers config class of the tower
    view_size: int
    input_size: int
    input_resize: Literal["nearest", "bicubic", "bilinear"] = "nearest"
    normalization: Literal["clip", "imagenet"] = "clip"  # what the tower expects; pixels arrive CLIP-normalised

    def __post_init__(self) -> None:
        if self.family not in ENCODER_FAMILIES:
            raise SphinxError(
                f"encoder {self.name!r}: unknown family {self.family!r}, expected one of {ENCODER_FAMILIES}"
            )
        if self.view_size <= 0 or self.input_size <= 0:
            raise SphinxError(f"encoder {self.name!r}: view_size and input_size must be positive")

    @property
    def grid(self) -> int | None:
        """Side of the encoder's spatial token grid at `input_size` (None for query-token encoders)."""
        if self.family in ("clip_vit", "dinov2"):
            return self.input_size // int(self.config.get("patch_size", 14))
        if self.family == "convnext":
            return self.input_size // (int(self.config.get("patch_size", 4)) * 8)  # stem /4, three /2 stages
        return None

    @property
    def has_cls(self) -> bool:
        return self.family in ("clip_vit", "dinov2")

    @property
    def num_tokens(self) -> int:
        """Tokens one view yields from this encoder, before any grid alignment."""
        if self.family == "blip2_qformer":
            return int(self.config.get("num_query_tokens", 32))
        grid = self.grid
        assert grid is not None
        return grid * grid + (1 if self.has_cls else 0)

    @property
    def width(self) -> int:
        """Channel width of this encoder's output tokens."""
        if self.family == "convnext":
            return int(self.config["hidden_sizes"][-1])
        if self.family == "blip2_qformer":
            return int(self.config.get("qformer_config", {}).get("hidden_size", 768))
        return int(self.config["hidden_size"])


@dataclass(frozen=True)
class FusionGroup:
    """Encoders concatenated along channels, then `name` = Linear(sum widths -> dim) + LayerNorm(dim).

    With several encoders, every one is brought to a `grid` x `grid` token grid (nearest upsampling of
    spatial maps; adaptive average pooling where `grid` is smaller, our addition) with a leading CLS token
    (the mean of the map where the encoder has none).

    `keep` (our addition, off in the release's presets) keeps only the `keep` most salient cells of each view's
    grid, scored by a linear `scorer` on the concatenated channels, in raster order and each with a learned
    embedding of its (view, cell) position; the CLS stays. A small LLM learns to pick the token a question
    names among a few informative ones, and not among many mostly empty ones (docs/world_report.md, tenth round).
    `box_frequencies` (our addition, with `keep`) makes the first 16 * len(box_frequencies) projected channels of a
    kept cell a box in phase form: they are multiplied by fixed sinusoids of the cell's centre, so that features
    that know only an object's extent around its cell give the LLM its absolute corners (eleventh round).
    """

    name: str  # projection module name: "visual_proj", "qformer_proj" in the release
    encoders: tuple[str, ...]
    grid: int | None = None  # common token grid; None: the largest grid among the group's encoders
    keep: int | None = None  # salient cells kept per view; None: every cell (the release)
    box_frequencies: tuple[float, ...] | None = None  # with `keep`: box-phase channels (see `Fusion.modulate`)


@dataclass(frozen=True)
class ViewPolicy:
    """A global view of the whole padded square plus a fixed grid of sub-images in raster order."""

    image_size: int  # side of the padded, resized square the processor produces
    grid: int = 0  # sub-images per side; 0: the global view only

    @property
    def num_views(self) -> int:
        return 1 + self.grid * self.grid


@strict
class SphinxConfig(PreTrainedConfig):
    """Configuration of `SphinxForConditionalGeneration` (model_type `sphinx`)."""

    model_type = "sphinx"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    encoders: list | None = None  # list of EncoderSpec as dicts (JSON-serialisable)
    fusion: list | None = None  # list of FusionGroup as dicts, in sequence order
    image_size: int = 224
    view_grid: int = 0
    image_token_id: int = 0  # placeholder id in input_ids; 0 (<unk>) keeps the release's 32000 vocab
    freeze_encoders: bool = True
    chat_template_name: str = "v1"
    preset: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.encoders = [asdict(e) if isinstance(e, EncoderSpec) else dict(e) for e in (self.encoders or [])]
        # `keep` and `box_frequencies` only where set, so the release presets' configs read as before they existed
        self.fusion = [{k: v for k, v in asdict(g).items() if k not in ("keep", "box_frequencies") or v is not None}
                       if isinstance(g, FusionGroup) else dict(g) for g in (self.fusion or [])]
        for g in self.fusion:
            g["encoders"] = list(g["encoders"])
        super().__post_init__(**kwargs)
        self._validate()

    # ---- typed views of the serialised fields -------------------------------------------------
    @property
    def encoder_specs(self) -> tuple[EncoderSpec, ...]:
        return tuple(EncoderSpec(**e) for e in self.encoders or [])

    @property
    def fusion_groups(self) -> tuple[FusionGroup, ...]:
        return tuple(
            FusionGroup(name=g["name"], encoders=tuple(g["encoders"]), grid=g.get("grid"), keep=g.get("keep"),
                        box_frequencies=tuple(g["box_frequencies"]) if g.get("box_frequencies") else None)
            for g in self.fusion or []
        )

    @property
    def view_policy(self) -> ViewPolicy:
        return ViewPolicy(image_size=self.image_size, grid=self.view_grid)

    @property
    def num_views(self) -> int:
        return self.view_policy.num_views

    def group_grid(self, group: FusionGroup) -> int | None:
        specs = {s.name: s for s in self.encoder_specs}
        grids = [specs[n].grid for n in group.encoders if specs[n].grid is not None]
        if group.grid is not None:
            return group.grid
        return max(grids) if grids else None

    def group_num_tokens(self, group: FusionGroup) -> int:
        """Tokens one view yields from one fusion group."""
        specs = {s.name: s for s in self.encoder_specs}
        if len(group.encoders) == 1:
            spec = specs[group.encoders[0]]
            if group.grid is None or spec.grid is None:
                return spec.num_tokens
        grid = self.group_grid(group)
        assert grid is not None
        return (group.keep if group.keep is not None else grid * grid) + 1

    def group_width(self, group: FusionGroup) -> int:
        specs = {s.name: s for s in self.encoder_specs}
        return sum(specs[n].width for n in group.encoders)

    @property
    def tokens_per_view(self) -> int:
        """All groups' tokens plus the learned start and end vectors around each view."""
        return sum(self.group_num_tokens(g) for g in self.fusion_groups) + 2

    @property
    def num_image_tokens(self) -> int:
        """THE count of image tokens per image: views x (group tokens + start + end)."""
        if not self.encoders:
            return 0
        return self.num_views * self.tokens_per_view

    # ---- validation ----------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.view_grid < 0 or self.image_size <= 0:
            raise SphinxError(f"bad view policy: image_size={self.image_size}, view_grid={self.view_grid}")
        specs = self.encoder_specs
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SphinxError(f"duplicate encoder names: {names}")
        grouped = [n for g in self.fusion_groups for n in g.encoders]
        unknown = sorted(set(grouped) - set(names))
        if unknown:
            raise SphinxError(f"fusion groups name unknown encoders: {unknown} (encoders: {names})")
        ungrouped = sorted(set(names) - set(grouped))
        if ungrouped:
            raise SphinxError(f"encoders not in any fusion group: {ungrouped}")
        if len(grouped) != len(set(grouped)):
            raise SphinxError(f"an encoder appears in several fusion groups: {grouped}")
        by_name = {s.name: s for s in specs}
        for spec in specs:
            if self.view_grid and spec.view_size * self.view_grid > 4 * self.image_size:
                raise SphinxError(f"encoder {spec.name!r}: view grid {self.view_grid} x {spec.view_size} px "
                                  f"is far larger than the image ({self.image_size} px)")
        for group in self.fusion_groups:
            members = [by_name[n] for n in group.encoders]
            if len(members) > 1 and any(m.grid is None for m in members):
                raise SphinxError(f"fusion group {group.name!r}: query-token encoders cannot be channel-concatenated")
            grid = self.group_grid(group)
            if grid is not None and grid < 1:
                raise SphinxError(f"fusion group {group.name!r}: grid {grid} must be >= 1")
            if group.keep is not None and (grid is None or not 1 <= group.keep <= grid * grid):
                cells = "no cell grid" if grid is None else f"{grid * grid} cells per view"
                raise SphinxError(f"fusion group {group.name!r}: keep={group.keep} needs 1 <= keep <= the grid's cells "
                                  f"({cells})")
            if group.box_frequencies is not None:
                width = 16 * len(group.box_frequencies)
                if group.keep is None or not group.box_frequencies or width > self.text_config.hidden_size:
                    raise SphinxError(f"fusion group {group.name!r}: box_frequencies needs keep and 16 channels per "
                                      f"frequency within the LLM's {self.text_config.hidden_size} (got "
                                      f"{len(group.box_frequencies)} frequencies, keep={group.keep})")
            for m in members:
                if m.grid is not None and grid is not None and grid > m.grid and grid % m.grid != 0:
                    raise SphinxError(f"fusion group {group.name!r}: encoder {m.name!r} grid {m.grid} does not "
                                      f"divide the common grid {grid} (a larger grid upsamples by a whole factor)")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SphinxConfig:
        """Build a preset by name (`available_presets()` lists them); `overrides` replace top-level fields."""
        if name not in PRESETS:
            raise SphinxError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(preset=name, **kwargs)


# =============================================================================================
# Presets. Towers are described by the kwargs of their transformers config classes.
# =============================================================================================

def _clip_l14(view: int = 224) -> EncoderSpec:
    # OpenAI CLIP ViT-L/14: all 257 tokens after ln_post, no projection.
    cfg = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
    return EncoderSpec("clip", "clip_vit", cfg, view_size=view, input_size=224)


def _convnext_xxl(view: int, input_size: int) -> EncoderSpec:
    # open_clip convnext_xxlarge trunk (LAION-2B soup): map after the head LayerNorm.
    cfg = dict(patch_size=4, num_stages=4, hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3],
               hidden_act="gelu", layer_norm_eps=1e-5, layer_scale_init_value=1e-6, image_size=input_size)
    return EncoderSpec("openclip_convnext_xxl", "convnext", cfg, view_size=view, input_size=input_size,
                       input_resize="nearest")


def _dinov2_g14(view: int = 224) -> EncoderSpec:
    # DINOv2 ViT-g/14 without registers: CLS + normalised patch tokens; trained at 518 px.
    cfg = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True,
               layerscale_value=1.0, image_size=518, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    return EncoderSpec("dinov2_vitg14", "dinov2", cfg, view_size=view, input_size=224, normalization="imagenet")


def _blip2_opt27b(view: int = 224) -> EncoderSpec:
    # BLIP-2 (blip2-opt-2.7b) EVA ViT-g + Q-Former, 32 query tokens.
    cfg = dict(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            cross_attention_frequency=2, encoder_hidden_size=1408),
        num_query_tokens=32,
    )
    return EncoderSpec("qformer", "blip2_qformer", cfg, view_size=view, input_size=224)


def _llama2_13b() -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _tinyllama() -> dict[str, Any]:
    return dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _mixtral_8x7b() -> dict[str, Any]:
    return dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


_FULL_GROUPS = [FusionGroup("qformer_proj", ("qformer",)),
                FusionGroup("visual_proj", ("clip", "openclip_convnext_xxl", "dinov2_vitg14"), grid=16)]
_LIGHT_GROUPS = [FusionGroup("visual_proj", ("openclip_convnext_xxl", "dinov2_vitg14"), grid=16)]


def _sphinx(image_size: int, grid: int) -> dict[str, Any]:
    encs = [_clip_l14(), _convnext_xxl(224, 256), _dinov2_g14(), _blip2_opt27b()]
    return dict(text_config=_llama2_13b(), encoders=encs, fusion=_FULL_GROUPS, image_size=image_size, view_grid=grid)


def _sphinx_tiny(image_size: int, grid: int) -> dict[str, Any]:
    encs = [_convnext_xxl(512, 512), _dinov2_g14()]
    return dict(text_config=_tinyllama(), encoders=encs, fusion=_LIGHT_GROUPS, image_size=image_size, view_grid=grid)


def _sphinx_moe(image_size: int, grid: int) -> dict[str, Any]:
    encs = [_clip_l14(), _convnext_xxl(512, 512), _dinov2_g14(), _blip2_opt27b()]
    return dict(text_config=_mixtral_8x7b(), encoders=encs, fusion=_FULL_GROUPS, image_size=image_size,
                view_grid=grid)


# ---- small CPU presets: the same structure (four encoder families, two groups, views) in seconds ----
def _debug_llm(moe: bool = False) -> dict[str, Any]:
    base = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    if moe:
        return dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    return dict(base, model_type="llama")


def _debug_encoders(convnext_view: int, convnext_input: int) -> list[EncoderSpec]:
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
    convnext = dict(patch_size=4, num_stages=4, hidden_sizes=[8, 16, 24, 48], depths=[1, 1, 1, 1], hidden_act="gelu",
                    layer_norm_eps=1e-5, layer_scale_init_value=1e-6, image_size=convnext_input)
    dinov2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, use_swiglu_ffn=True,
                  layerscale_value=1.0, image_size=518, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    blip2 = dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            cross_attention_frequency=2, encoder_hidden_size=32),
        num_query_tokens=8,
    )
    return [
        EncoderSpec("clip", "clip_vit", clip, view_size=224, input_size=224),
        EncoderSpec("openclip_convnext_xxl", "convnext", convnext, view_size=convnext_view, input_size=convnext_input),
        EncoderSpec("dinov2_vitg14", "dinov2", dinov2, view_size=224, input_size=224, normalization="imagenet"),
        EncoderSpec("qformer", "blip2_qformer", blip2, view_size=224, input_size=224),
    ]


# ---- the synthetic world's preset (`sphinx-mllm world run`): the full structure at laptop-CPU size ----
WORLD_BOX_FREQUENCIES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
"""`world-tiny-box`'s box-phase frequencies (80 of the LLM's 256 channels): 0.5 cycles keeps a corner unambiguous over
the whole square, 8 resolves it to about 0.01 (docs/world_report.md, eleventh round)."""


def _world_llm() -> dict[str, Any]:
    # vocab: the world tokenizer's byte-level BPE (1024) + coordinate and phrase tokens, rounded up
    return dict(model_type="llama", vocab_size=1152, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)


def _world_encoders() -> list[EncoderSpec]:
    # Three families on one 7 x 7 grid per view: CLIP ViT-B/16-like at 112 px, ConvNeXt at 224 px (the
    # sub-images at the world's native resolution), DINOv2 ViT at 112 px. Pre-trained by `sphinx_mllm.world`.
    clip = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=112,
                patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64)
    convnext = dict(patch_size=4, num_stages=4, hidden_sizes=[32, 64, 128, 192], depths=[1, 1, 3, 1],
                    hidden_act="gelu", layer_norm_eps=1e-5, layer_scale_init_value=1e-6, image_size=224)
    dinov2 = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4, use_swiglu_ffn=False,
                  layerscale_value=1.0, image_size=112, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    return [
        EncoderSpec("clip", "clip_vit", clip, view_size=112, input_size=112),
        EncoderSpec("convnext", "convnext", convnext, view_size=224, input_size=224),
        EncoderSpec("dinov2", "dinov2", dinov2, view_size=112, input_size=112, normalization="imagenet"),
    ]


PRESETS: dict[str, dict[str, Any]] = {
    "sphinx": _sphinx(224, 0),
    "sphinx-1k": _sphinx(448, 2),
    "sphinx-2k": _sphinx(672, 3),
    "sphinx-tiny": _sphinx_tiny(512, 0),
    "sphinx-tiny-1k": _sphinx_tiny(1024, 2),
    "sphinx-moe": _sphinx_moe(512, 0),
    "sphinx-moe-1k": _sphinx_moe(1024, 2),
    "debug": dict(text_config=_debug_llm(), encoders=_debug_encoders(224, 256), fusion=_FULL_GROUPS,
                  image_size=224, view_grid=0),
    "debug-1k": dict(text_config=_debug_llm(), encoders=_debug_encoders(224, 256), fusion=_FULL_GROUPS,
                     image_size=448, view_grid=2),
    "debug-moe": dict(text_config=_debug_llm(moe=True), encoders=_debug_encoders(512, 512), fusion=_FULL_GROUPS,
                      image_size=512, view_grid=0),
    "world-tiny": dict(text_config=_world_llm(), encoders=_world_encoders(),
                       fusion=[FusionGroup("visual_proj", ("clip", "convnext", "dinov2"), grid=7)],
                       image_size=448, view_grid=2),
    # The same with each view's 8 most salient cells kept (55 image tokens instead of 260): `world run --bind`.
    "world-tiny-keep": dict(text_config=_world_llm(), encoders=_world_encoders(),
                            fusion=[FusionGroup("visual_proj", ("clip", "convnext", "dinov2"), grid=7, keep=8)],
                            image_size=448, view_grid=2),
    "world-tiny-box": dict(text_config=_world_llm(), encoders=_world_encoders(),
                           fusion=[FusionGroup("visual_proj", ("clip", "convnext", "dinov2"), grid=7, keep=8,
                                               box_frequencies=WORLD_BOX_FREQUENCIES)],
                           image_size=448, view_grid=2),
}

# The release's `meta.json` llama_type of each release preset (SPHINX.md section 2).
RELEASE_LLAMA_TYPES: dict[str, str] = {
    "sphinx": "llama_ens", "sphinx-1k": "llama_ens5", "sphinx-2k": "llama_ens10", "sphinx-tiny": "llama_ens_light",
    "sphinx-tiny-1k": "llama_ens5_light", "sphinx-moe": "mixtral_sparse_ens", "sphinx-moe-1k": "mixtral_sparse_ens5",
}


def available_presets() -> list[str]:
    return list(PRESETS)


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "RELEASE_LLAMA_TYPES",
    "EncoderSpec", "FusionGroup", "SphinxConfig", "ViewPolicy", "available_presets",
]
