"""Several sources mixed by weight, and a curriculum over stages: which document training reads next.

`data.mixture` names sources, each a few `data` keys (source, paths, fields) and a `weight`: a number,
or a schedule `((step, w), ...)`. `data.curriculum_field` splits every source into stages by an
integer field of its records (the `bucket` that `jaxllm prep` writes: 0 = easiest) and
`data.curriculum_schedule = ((step, (w0, w1, ...)), ...)` gives the stages' weights over training
steps. Schedules hold their first value before the first point, their last after the last one, and
are linear in between.

Each draw takes a document from (source c, stage s) with probability proportional to

    w_c(step) * w_s(step) / (sum of w_s'(step) over the stages s' that c has),

so a source's share follows its own weight while any of its stages has weight (a source whose stages
all have weight 0 waits). Each row of the global batch (a lane, `jaxllm.data.lanes`) draws on its own,
with a counter-based hash of (seed, row, draw number): the same sequence on every run and any number of
processes, restored from a checkpoint with a few integers per row. A row's step is its tokens drawn so
far / (block_size + 1); window shuffling puts a document up to a window of steps from the batch that
holds it. Weights count documents, as in Grain's and Hugging Face's mixing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxllm import JaxllmError
from jaxllm.data.hashing import mix64

# `data` keys a mixture entry may set; everything else (tokenizer, format, block and batch) is shared.
COMPONENT_KEYS = (
    "source",
    "paths",
    "text_field",
    "text_split",
    "tfds_name",
    "tfds_split",
    "tfds_data_dir",
    "prompt_field",
    "completion_field",
    "messages_field",
)

Schedule = tuple[tuple[float, tuple[float, ...]], ...]  # (step, weights) points, steps increasing


@dataclasses.dataclass(frozen=True)
class Component:
    """One entry of `data.mixture`: its `data` key overrides and its weight schedule (width 1)."""

    name: str
    overrides: tuple[tuple[str, Any], ...]
    weight: Schedule


def parse_mixture(value: Any) -> tuple[Component, ...]:
    """`data.mixture` (a dict of dicts, or already parsed) -> components, in the order given."""
    if value is None or (isinstance(value, (tuple, list, Mapping)) and not value):
        return ()
    if isinstance(value, tuple) and all(isinstance(c, Component) for c in value):
        return value
    if not isinstance(value, Mapping):
        raise JaxllmError(
            f"data.mixture must be a dict like {{'web': {{'source': 'jsonl', 'paths': ('web/*.jsonl',), "
            f"'weight': 3.0}}, ...}}, got {value!r}"
        )
    components = []
    for name, entry in value.items():
        key = f"data.mixture.{name}"
        if not isinstance(entry, Mapping):
            raise JaxllmError(f"{key} must be a dict of data keys and a weight, got {entry!r}")
        entry = dict(entry)
        weight = parse_schedule(entry.pop("weight", 1.0), f"{key}.weight", scalar=True)
        for k, v in entry.items():
            if k not in COMPONENT_KEYS:
                close = difflib.get_close_matches(k, COMPONENT_KEYS + ("weight",), n=1)
                hint = (
                    f"; did you mean {key}.{close[0]}?" if close else f"; a source may set {', '.join(COMPONENT_KEYS)}"
                )
                raise JaxllmError(f"unknown key {key}.{k}{hint} and weight")
            if k == "paths":
                entry[k] = (v,) if isinstance(v, str) else tuple(v)
        components.append(Component(str(name), tuple(sorted(entry.items())), weight))
    return tuple(components)


def parse_schedule(value: Any, key: str, scalar: bool = False) -> Schedule:
    """A weight schedule: a number (scalar=True), or ((step, w), ...) with w a number (scalar) or a
    tuple of numbers, steps strictly increasing, weights finite and >= 0."""
    example = "((0, 1.0), (1000, 0.5))" if scalar else "((0, (1.0, 0.0)), (1000, (0.5, 0.5)))"
    if scalar and _is_number(value):
        value = ((0, value),)
    if not isinstance(value, (tuple, list)) or not value:
        raise JaxllmError(
            f"{key} must be {'a number or ' if scalar else ''}a list of (step, weights) points "
            f"like {example}, got {value!r}"
        )
    points: list[tuple[float, tuple[float, ...]]] = []
    for point in value:
        if not isinstance(point, (tuple, list)) or len(point) != 2 or not _is_number(point[0]):
            raise JaxllmError(f"{key}: each point must be (step, weights) like {example}, got {point!r}")
        step, weights = point
        weights = (weights,) if scalar and _is_number(weights) else weights
        if (
            not isinstance(weights, (tuple, list))
            or not weights
            or not all(_is_number(w) for w in weights)
            or (scalar and len(weights) != 1)
        ):
            raise JaxllmError(
                f"{key}: at step {step} the weights must be {'a number' if scalar else 'a tuple of numbers'}, "
                f"got {weights!r}"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise JaxllmError(f"{key}: weights must be finite and >= 0, got {tuple(weights)} at step {step}")
        if step < 0 or (points and step <= points[-1][0]):
            raise JaxllmError(f"{key}: steps must be >= 0 and increasing, got {[p[0] for p in points] + [step]}")
        if points and len(weights) != len(points[0][1]):
            raise JaxllmError(
                f"{key}: every point needs {len(points[0][1])} weights (one per stage), got "
                f"{tuple(weights)} at step {step}"
            )
        points.append((float(step), tuple(float(w) for w in weights)))
    return tuple(points)


def at(schedule: Schedule, step: float) -> np.ndarray:
    """The weights of `schedule` at `step` (linear between points, held outside them)."""
    steps = [p[0] for p in schedule]
    table = np.asarray([p[1] for p in schedule], np.float64)
    return np.asarray([np.interp(step, steps, table[:, j]) for j in range(table.shape[1])])


class Weights:
    """Draw weights of the leaves (component, stage) at a step; empty leaves get none."""

    def __init__(
        self,
        components: Sequence[Schedule],
        stages: Schedule | None,
        leaves: Sequence[tuple[int, int]],
        names: Sequence[str],
    ):
        self.components, self.stages, self.leaves, self.names = list(components), stages, list(leaves), list(names)
        self._component = np.asarray([c for c, _ in self.leaves])
        self._stage = np.asarray([s for _, s in self.leaves])
        breakpoints = sorted({p[0] for s in self.components + ([stages] if stages else []) for p in s})
        for step in breakpoints:  # weights are piecewise linear: positive at every point = positive throughout
            if not self(step).sum() > 0:
                raise JaxllmError(
                    f"at step {step:g} every weighted source or curriculum stage is empty (leaves: "
                    f"{', '.join(names)}); give weight to stages that hold documents"
                )

    def __call__(self, step: float) -> np.ndarray:
        stage_w = (at(self.stages, step) if self.stages else np.ones(1))[self._stage]
        component_w = np.asarray([at(schedule, step)[0] for schedule in self.components])
        totals = np.bincount(self._component, weights=stage_w, minlength=len(self.components))  # per source
        share = np.divide(
            stage_w, totals[self._component], out=np.zeros(len(stage_w)), where=totals[self._component] > 0
        )
        return component_w[self._component] * share


def uniform(seed: int, counter: int) -> float:
    """A uniform [0, 1) number from (seed, counter): splitmix64, platform-independent."""
    x = np.uint64((seed * 0x9E3779B97F4A7C15 + counter + 1) & 0xFFFFFFFFFFFFFFFF)
    return (int(mix64(x)) >> 11) / float(1 << 53)


def stage_of(row: Any, field: str, where: str, num_stages: int) -> int:
    """The curriculum stage of a record: its integer `field`, in [0, num_stages)."""
    value = row.get(field) if isinstance(row, Mapping) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < num_stages:
        raise JaxllmError(
            f"{where}: curriculum field {field!r} is {value!r}, but data.curriculum_schedule gives "
            f"weights to {num_stages} stages (integers 0..{num_stages - 1}); fix the record or the schedule"
        )
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
