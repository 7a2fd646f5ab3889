"""Meshes and the logical-axis -> mesh-axis rules: the only module that knows mesh axis names."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import JaxllmError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Flax resolves each tensor's axes left to right and never uses a mesh
# axis twice, so an activation's "embed" (after "batch" took fsdp) stays unsharded.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_length", "tensor"),  # the residual stream between blocks (sequence parallelism)
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)

BATCH_AXES = ("data", "fsdp")
_rules = LOGICAL_RULES  # in force: LOGICAL_RULES with the run's `mesh.rules` on top (`make_mesh` sets them)


def target_platform() -> str:
    """The platform the code being traced will run on: that of the current mesh's devices, else
    JAX's default backend. An AOT compile for a TPU topology from a CPU host (`jax.set_mesh` on a
    mesh of topology devices, as the train step and `jaxllm plan` run) thus counts as TPU."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def set_rules(overrides: Sequence[Sequence[Any]] = ()) -> None:
    """Puts LOGICAL_RULES with `overrides` ((logical axis, mesh axis | [mesh axes] | None), ...) in force."""
    global _rules
    _rules = merged_rules(overrides)


def merged_rules(overrides: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """LOGICAL_RULES with `overrides` in place of their entries (checked: known logical and mesh axes)."""
    merged = dict(LOGICAL_RULES)
    for item in overrides:
        if len(item) != 2 or item[0] not in merged:
            raise JaxllmError(
                f"mesh.rules: {tuple(item)!r} is not (logical axis, mesh axes) with a logical axis "
                f"among {', '.join(merged)}"
            )
        axes = item[1] if item[1] is None or isinstance(item[1], str) else tuple(item[1])
        if any(a not in MESH_AXES for a in ((axes,) if isinstance(axes, str) else axes or ())):
            raise JaxllmError(f"mesh.rules: {item[0]} -> {axes!r}; mesh axes are {', '.join(MESH_AXES)} (or None)")
        merged[item[0]] = axes
    return tuple(merged.items())


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = -1  # data parallel (-1: the devices the other axes leave)
    fsdp: int = 1  # fully sharded data parallel: parameters and optimizer state split over this axis
    tensor: int = 1  # tensor (model) parallel
    slice: str = ""  # the Cloud TPU slice the config is sized for (e.g. v5p-512): `jaxllm plan`'s default topology
    rules: tuple = ()  # ((logical axis, mesh axes | None), ...) replacing LOGICAL_RULES' entries for this run

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))
        merged_rules(self.rules)  # checked now; in force from `make_mesh`

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise JaxllmError(f"mesh {self._text()}: at most one axis may be -1 (auto-fill)")
        if any(s == 0 or s < -1 for s in sizes):
            raise JaxllmError(f"mesh {self._text()}: axis sizes must be positive or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise JaxllmError(
                    f"mesh {self._text()} does not divide the {num_devices} devices; "
                    f"make the fixed axes' product ({known}) divide {num_devices}"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise JaxllmError(
                f"mesh {self._text()} has {math.prod(sizes)} devices but {num_devices} are "
                "available; set one axis to -1 or make the product equal the device count"
            )
        return tuple(sizes)

    def _text(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}"


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh laid out for the physical topology (ICI/NVLink neighbours on the inner axes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = cfg.shape(len(devices))
    set_rules(cfg.rules)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # several TPU slices joined over the data-center network: the data axis spans them
        if shape[0] % slices:
            raise JaxllmError(
                f"mesh {cfg._text()} (data={shape[0]}) must put the data axis across the {slices} "
                f"slices: make mesh.data a multiple of {slices}"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // slices, *shape[1:]), (slices, 1, 1), devices, allow_split_physical_axes=True
        )
        return Mesh(grid, MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None]) -> P:
    return nn.logical_to_mesh_axes(tuple(logical_axes), _rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Any, name: str | None) -> P:
    """Drops mesh axes that do not divide a dimension (e.g. 8 kv heads on tensor=16): replicate it.
    `name`: what to warn about (a parameter); None for activations (a batch of 1 prompt, say)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in group)
        if group and dim % size:
            if name is not None:
                logging.warning("%s: dim %d not divisible by mesh axes %s (%d); replicating it", name, dim, group, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation to the mesh axes its logical axes map to under `activate` (axes that do not
    divide its dimensions are left out); outside a mesh it is returned as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = nn.logical_to_mesh_axes(tuple(logical_axes))
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, mesh, None))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh a pytree of arrays is sharded over, if it spans more than one device."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def shardings_for(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract pytree, from its logical axes."""
    logical = nn.get_partition_spec(abstract_tree)
    unboxed = unbox(abstract_tree)

    def one(path, spec, leaf):
        if not hasattr(leaf, "shape"):
            return NamedSharding(mesh, P())
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), _rules) if spec else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    shards = batch_shards(mesh)
    if batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % shards:
        raise JaxllmError(
            f"batch size {batch_size} split into {grad_accum_steps} micro-batches does not divide "
            f"the data axes (data*fsdp={shards}); make batch_size a multiple of "
            f"{shards * grad_accum_steps}"
        )


def process_rows(mesh: Mesh, batch_size: int) -> list[int]:
    """The rows of a global batch of `batch_size` that this process's devices hold, in the order
    `global_batch` takes its local rows (the data pipeline reads exactly these)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    return sorted({row for index in indices.values() for row in range(batch_size)[index[0]]})


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def axis_rules():
    """Context manager under which Flax resolves the models' logical activation constraints."""
    return nn.logical_axis_rules(_rules)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """The mesh and the logical rules in force together: what jitted model code runs under.

    `jax.set_mesh` is what makes the models' logical constraints (`constrain`) emit anything; under the
    legacy `with mesh:` Flax's resolve to nothing, and XLA is then free to keep activations of the whole
    global batch on every device (FSDP moving activations instead of weights)."""
    with jax.set_mesh(mesh), axis_rules():
        yield


def placed(boxed: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of a (possibly boxed) abstract tree, each with its sharding: what `.lower()` and an
    Orbax restore take."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox(boxed), shardings)


def unbox(tree: Any) -> Any:
    """The values of a (possibly `nn.Partitioned`-boxed) pytree, without applying their constraints
    (an abstract tree holds shapes, which a constraint cannot take outside a trace)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def to_host(leaf: jax.Array) -> np.ndarray:
    """The whole value of `leaf` as a numpy array on this host (gathered from every process when the
    array spans several)."""
    if not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
