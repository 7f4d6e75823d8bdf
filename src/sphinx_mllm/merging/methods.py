"""Merge methods: pure functions over tensors, and a registry that the streaming mixer drives.

Each function takes the tensors of one parameter name (same shape) and returns the merged tensor; math runs
in fp32 and the caller casts the result. Semantics follow mergekit's definitions:

- `linear(a, b, beta)`: `beta * a + (1 - beta) * b` (SPHINX's weight mixing); beta 1 / 0 return a / b exactly.
- `slerp(a, b, t)`: spherical interpolation of the flattened tensors, t=0 gives `a`, t=1 gives `b` (mergekit's
  convention, the reverse of beta's); nearly colinear tensors (|cos| > 0.9995) or a zero tensor fall back to
  linear interpolation.
- `task_arithmetic(base, models, weights)`: `base + sum_i w_i (m_i - base)`.
- `ties(base, models, weights, density)`: trim each task vector to its top `density` fraction by magnitude,
  elect a sign per element (sign of the sum of the weighted trimmed deltas, 0 counts as +), then average the
  weighted deltas that agree with it (disjoint mean: divided by the sum of the agreeing weights).
- `dare(base, models, weights, density, generator, combine)`: drop each delta element with probability
  `1 - density` and rescale the kept ones by `1 / density`; then `combine="linear"` sums the weighted deltas
  (mergekit's dare_linear) and `combine="ties"` keeps only those agreeing with the elected sign and sums them
  without dividing (mergekit's dare_ties).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sphinx_mllm.utils import SphinxError

Tensor = torch.Tensor
COLINEAR_THRESHOLD = 0.9995
DARE_COMBINES = ("linear", "ties")


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def linear(a: Tensor, b: Tensor, beta: float) -> Tensor:
    """`beta * a + (1 - beta) * b` in fp32; beta 1 and 0 return copies of `a` and `b` bit for bit."""
    if beta == 1.0:
        return _f32(a).clone()
    if beta == 0.0:
        return _f32(b).clone()
    out = _f32(a) * beta  # one new tensor; the fp32 inputs are not copied
    return out.add_(_f32(b), alpha=1.0 - beta)


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) over the whole tensor seen as one vector."""
    if t == 0.0:
        return _f32(a).clone()
    if t == 1.0:
        return _f32(b).clone()
    a32, b32 = _f32(a), _f32(b)
    na, nb = a32.double().norm().item(), b32.double().norm().item()
    if na < 1e-8 or nb < 1e-8:
        return a32 * (1.0 - t) + b32 * t
    cos = (a32.double().flatten() @ b32.double().flatten()).item() / (na * nb)
    if abs(cos) > COLINEAR_THRESHOLD:
        return a32 * (1.0 - t) + b32 * t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s0 = math.sin((1.0 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return a32 * s0 + b32 * s1


def _deltas(base: Tensor, models: Sequence[Tensor]) -> Tensor:
    base32 = _f32(base)
    return torch.stack([_f32(m) - base32 for m in models])  # (N, *shape)


def _weights(weights: Sequence[float], like: Tensor) -> Tensor:
    w = torch.tensor(list(weights), dtype=torch.float32)
    return w.view(-1, *([1] * (like.dim() - 1)))  # (N, 1, ..., 1): broadcasts over (N, *shape)


def _check_weights(models: Sequence[Tensor], weights: Sequence[float]) -> None:
    if len(weights) != len(models):
        raise SphinxError(f"{len(models)} models but {len(weights)} weights")
    if not models:
        raise SphinxError("no model to merge")


def task_arithmetic(base: Tensor, models: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """`base + sum_i w_i (m_i - base)`."""
    _check_weights(models, weights)
    deltas = _deltas(base, models)
    return _f32(base) + (deltas * _weights(weights, deltas)).sum(dim=0)


def trim_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of largest-magnitude elements (at least one), zero the rest."""
    if density >= 1.0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.flatten()
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(k).indices] = 1.0
    return (flat * keep).view_as(delta)


def elect_sign_mask(weighted: Tensor) -> Tensor:
    """Mask (N, ...) of the elements whose sign agrees with the sign of the sum over models (0 counts as +).
    Zero elements never agree, so trimmed or dropped entries take no part."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return (weighted.sign() == majority).to(weighted.dtype)


def ties(base: Tensor, models: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES: trim by magnitude, elect sign, disjoint (weighted) mean of the agreeing deltas, added to base."""
    _check_weights(models, weights)
    deltas = torch.stack([trim_by_magnitude(d, density) for d in _deltas(base, models)])
    w = _weights(weights, deltas)
    weighted = deltas * w
    mask = elect_sign_mask(weighted)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1.0
    return _f32(base) + (weighted * mask).sum(dim=0) / divisor


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's sparsification: keep each element with probability `density`, rescaled by `1 / density`."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype))


def dare(base: Tensor, models: Sequence[Tensor], weights: Sequence[float], density: float,
         generator: torch.Generator, combine: str = "linear") -> Tensor:
    """DARE: drop and rescale each task vector, then combine them ("linear" or "ties", see the module doc)."""
    _check_weights(models, weights)
    if combine not in DARE_COMBINES:
        raise SphinxError(f"dare: unknown combine {combine!r}, expected one of {DARE_COMBINES}")
    deltas = torch.stack([drop_and_rescale(d, density, generator) for d in _deltas(base, models)])
    weighted = deltas * _weights(weights, deltas)
    if combine == "ties":
        weighted = weighted * elect_sign_mask(weighted)
    return _f32(base) + weighted.sum(dim=0)


# --- registry -------------------------------------------------------------------------------------------

REQUIRED = object()  # marks a parameter without default


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: how many models it takes, whether it needs a base, its parameters (name ->
    default or REQUIRED), and `merge(models, base, params, key)` that calls the pure function."""

    name: str
    merge: Callable[[Sequence[Tensor], Tensor | None, Mapping[str, Any], str], Tensor]
    min_models: int
    max_models: int | None
    needs_base: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    sweep_param: str | None = None  # the scalar a `--sweep` varies

    def resolve_params(self, given: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Defaults filled in and everything checked; an error names the method and the parameter."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise SphinxError(f"method {self.name!r} does not take {unknown} (it takes: {sorted(self.params)})")
        out: dict[str, Any] = {}
        for name, default in self.params.items():
            value = given.get(name, default)
            if value is REQUIRED:
                raise SphinxError(f"method {self.name!r} needs {name!r}")
            out[name] = value
        if "weights" in out:
            out["weights"] = list(out["weights"]) if out["weights"] is not None else [1.0] * n_models
            if len(out["weights"]) != n_models:
                raise SphinxError(f"method {self.name!r}: {n_models} models but {len(out['weights'])} weights")
        for name in ("beta", "t"):
            if name in out and not 0.0 <= out[name] <= 1.0:
                raise SphinxError(f"method {self.name!r}: {name} must be in [0, 1], got {out[name]}")
        if "density" in out and not 0.0 < out["density"] <= 1.0:
            raise SphinxError(f"method {self.name!r}: density must be in (0, 1], got {out['density']}")
        if "combine" in out and out["combine"] not in DARE_COMBINES:
            raise SphinxError(f"method {self.name!r}: combine must be one of {DARE_COMBINES}, got {out['combine']!r}")
        return out


def _tensor_generator(seed: int, key: str) -> torch.Generator:
    """A generator per (seed, tensor name): the drop pattern of a tensor does not depend on the order of work."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63))


# Adapters from the registry's uniform call (models, base, params, tensor name) to the pure functions.
def _linear(ms: Sequence[Tensor], _base: Tensor | None, p: Mapping[str, Any], _key: str) -> Tensor:
    return linear(ms[0], ms[1], p["beta"])


def _slerp(ms: Sequence[Tensor], _base: Tensor | None, p: Mapping[str, Any], _key: str) -> Tensor:
    return slerp(ms[0], ms[1], p["t"])


def _task_arithmetic(ms: Sequence[Tensor], base: Tensor | None, p: Mapping[str, Any], _key: str) -> Tensor:
    assert base is not None
    return task_arithmetic(base, ms, p["weights"])


def _ties(ms: Sequence[Tensor], base: Tensor | None, p: Mapping[str, Any], _key: str) -> Tensor:
    assert base is not None
    return ties(base, ms, p["weights"], p["density"])


def _dare(ms: Sequence[Tensor], base: Tensor | None, p: Mapping[str, Any], key: str) -> Tensor:
    assert base is not None
    return dare(base, ms, p["weights"], p["density"], _tensor_generator(p["seed"], key), p["combine"])


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", _linear, 2, 2, False, {"beta": REQUIRED}, sweep_param="beta"),
        MergeMethod("slerp", _slerp, 2, 2, False, {"t": REQUIRED}, sweep_param="t"),
        MergeMethod("task_arithmetic", _task_arithmetic, 1, None, True, {"weights": None}),
        MergeMethod("ties", _ties, 1, None, True, {"weights": None, "density": REQUIRED}),
        MergeMethod("dare", _dare, 1, None, True,
                    {"weights": None, "density": REQUIRED, "seed": 0, "combine": "linear"}),
    )
}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise SphinxError(f"unknown merge method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
