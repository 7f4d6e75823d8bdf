"""The SPHINX world: a seeded synthetic multi-task data set, drawn with Pillow in seconds.

Scenes of flat shapes (some small enough to need the high-resolution views), stick-figure people with
the 17 COCO keypoints, signs (scene text) and document pages with layout regions, in square, landscape
and portrait sizes. From them, training and held-out records for every task of `sphinx_mllm.tasks.TASKS`
in the converters' JSONL layout, two caption pre-training corpora (`real`: short noisy alt-text;
`synthetic`: clean complete captions), mixture YAMLs and a manifest:

    from sphinx_mllm.world import WorldConfig, generate_world
    manifest = generate_world("world", WorldConfig(seed=0, size="small", image_size=224))

Labels are right by construction (boxes are measured on masks drawn by the same calls) and checked on
the saved pixels by the tests. Questions are balanced so that a text-only model stays at chance.
"""

from sphinx_mllm.world.generate import (
    GENERATOR_VERSION,
    SIZES,
    SPLITS,
    WorldConfig,
    ensure_world,
    generate_world,
    load_manifest,
    verify_world,
    world_image,
)
from sphinx_mllm.world.scene import KINDS, WorldImage, render, sample_image

__all__ = [
    "GENERATOR_VERSION",
    "KINDS",
    "SIZES",
    "SPLITS",
    "WorldConfig",
    "WorldImage",
    "ensure_world",
    "generate_world",
    "load_manifest",
    "render",
    "sample_image",
    "verify_world",
    "world_image",
]
