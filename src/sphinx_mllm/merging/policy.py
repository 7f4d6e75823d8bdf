"""Which tensors are mixed and which are carried over, and the checks made before any output is written.

Default module policy (SPHINX mixes the LLM, the encoders stay frozen and shared):
- mixed: the LLM and the projections: `language_model.*`, `fusion.*` (our keys) and `llma.*` (release keys);
- kept: the encoders, `vision.encoders.*` and, in release names, `llma.clip.*`, `llma.openclip_convnext_xxl.*`,
  `llma.dinov2_vitg14.*`, `llma.qformer.*`: they must be identical in every input (bit for bit) and are copied;
  any other tensor, and any non-float tensor, is kept under the same rule;
- `include` patterns add tensors to the mixed set (even encoders); `exclude` patterns take tensors out of it:
  they are copied from the first model without any check ("explicitly excluded");
- `allow_encoder_mismatch`: kept tensors that differ are copied from the first model instead of failing.
Patterns are shell globs over the full tensor name (`*` also crosses dots); exclude wins over include.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from sphinx_mllm.merging.sources import TensorSource
from sphinx_mllm.utils import SphinxError

DEFAULT_MIX: tuple[str, ...] = ("language_model.*", "fusion.*", "llma.*")
ENCODER_PATTERNS: tuple[str, ...] = (
    "vision.encoders.*", "llma.clip.*", "llma.openclip_convnext_xxl.*", "llma.dinov2_vitg14.*", "llma.qformer.*",
)

MIX = "mixed"
KEEP = "copied (identical in every input)"
EXCLUDED = "copied from the first model (excluded)"
ACTIONS = (MIX, KEEP, EXCLUDED)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


@dataclass(frozen=True)
class ModulePolicy:
    """What happens to each tensor name (see the module doc)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_encoder_mismatch: bool = False
    mix: tuple[str, ...] = DEFAULT_MIX
    encoders: tuple[str, ...] = ENCODER_PATTERNS

    def action(self, key: str, dtype: torch.dtype) -> str:
        if _matches(key, self.exclude):
            return EXCLUDED
        if not dtype.is_floating_point:
            return KEEP
        if _matches(key, self.include):
            return MIX
        if _matches(key, self.encoders):
            return KEEP
        return MIX if _matches(key, self.mix) else KEEP

    def unused_patterns(self, keys: Sequence[str]) -> list[str]:
        """`include`/`exclude` patterns that match no tensor (almost always a typo)."""
        return [p for p in (*self.include, *self.exclude) if not any(fnmatchcase(k, p) for k in keys)]


def module_of(key: str) -> str:
    """A short module name for reports: `vision.encoders.clip`, `llma.clip`, `language_model.model`..."""
    parts = key.split(".")
    depth = 3 if key.startswith("vision.encoders.") else 2
    return ".".join(parts[:depth])


def check_compatible(sources: Mapping[str, TensorSource]) -> list[str]:
    """The first source's key order, after checking that every source has the same names and shapes.

    A SphinxError lists every problem: each name missing from some input and each shape that differs.
    """
    names = list(sources)
    kinds = {name: src.kind for name, src in sources.items()}
    if len(set(kinds.values())) > 1:
        raise SphinxError("inputs are in different formats (" + ", ".join(f"{n}: {k}" for n, k in kinds.items())
                          + "); convert them to one format first")
    key_lists = {name: src.keys() for name, src in sources.items()}
    key_sets = {name: set(keys) for name, keys in key_lists.items()}
    union = list(dict.fromkeys(k for keys in key_lists.values() for k in keys))
    problems: list[str] = []
    for key in union:
        missing = [n for n in names if key not in key_sets[n]]
        if missing:
            problems.append(f"{key}: missing in {', '.join(missing)}")
            continue
        shapes = {n: tuple(sources[n].shape(key)) for n in names}
        if len(set(shapes.values())) > 1:
            problems.append(f"{key}: shapes differ (" + ", ".join(f"{n} {list(s)}" for n, s in shapes.items()) + ")")
    if problems:
        where = ", ".join(f"{n} = {src.path}" for n, src in sources.items())
        raise SphinxError(f"inputs do not match ({len(problems)} problems; {where}):\n  " + "\n  ".join(problems))
    return list(key_lists[names[0]])


def _identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def find_differences(sources: Mapping[str, TensorSource], keys: Sequence[str],
                     on_tensor: Callable[[int], None] | None = None) -> list[str]:
    """The names among `keys` whose tensors are not bit-identical in every source (reads one tensor at a time).
    `on_tensor(nbytes)` is called after each name (progress)."""
    names = list(sources)
    first = sources[names[0]]
    differ = []
    for key in keys:
        ref = first.get(key)
        if any(not _identical(ref, sources[n].get(key)) for n in names[1:]):
            differ.append(key)
        if on_tensor is not None:
            on_tensor(ref.numel() * ref.element_size())
        del ref
    return differ


def describe_differences(keys: Sequence[str]) -> str:
    """Every differing name, grouped by module: `module (n tensors): name, name, ...`."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(module_of(key), []).append(key)
    return "\n  ".join(f"{mod} ({len(ks)} tensors): {', '.join(ks)}" for mod, ks in groups.items())
