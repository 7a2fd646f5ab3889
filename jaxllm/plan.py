"""`jaxllm plan`: compile a run's exact train step ahead of time for a Cloud TPU slice (XLA's TPU compiler
through libtpu, on any machine, no TPU needed) or for the local devices, and report whether it fits,
the memory per chip and where it goes, and what the step costs as the compiler sees it (`jaxllm.cost`).
`search` tries meshes, remat policies and micro-batching, compiles them in the order of an analytic
step-time estimate (see `estimate`) and returns the setting that fits with the lowest compiled cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxllm import JaxllmError, cost
from jaxllm import sharding as shd
from jaxllm.config import apply_override
from jaxllm.train.metrics import peak_tflops
from jaxllm.train.program import OutOfMemory, build

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: how its slices are named and laid out, and the figures the estimate uses."""

    topology: str  # libtpu's name in topology strings ("v5:4x8x8")
    chip_config: str  # "megacore": one device per chip of two TensorCores (v4, v5p)
    cores_per_chip: int  # a slice name counts TensorCores ("v5p-512" = 256 chips)
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    ici_link_bytes_s: float  # one-way bandwidth of one ICI link
    dcn_bytes_s: float  # data-center network bandwidth per chip (between slices)


CHIPS = {
    "v4": Chip("v4", "megacore", 2, 3, 4.5e10, 6.25e9),
    "v5p": Chip("v5", "megacore", 2, 3, 9e10, 6.25e9),
    "v5e": Chip("v5e", "default", 1, 2, 4.5e10, 3.1e9),
    "v6e": Chip("v6e", "default", 1, 2, 9e10, 3.1e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The physical chip grid of a slice: each doubling doubles the smallest axis (the last such),
    so 256 v5p chips are 4x8x8 and 256 v5e chips are 16x16."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if dims == 3 and chips < 4:
        raise JaxllmError(f"a 3-D TPU slice has at least 4 chips (v4-8 / v5p-8); got {chips}")
    while math.prod(shape) < chips:
        i = max(j for j, d in enumerate(shape) if d == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise JaxllmError(f"{chips} chips is not a TPU slice size (a power of two)")
    return tuple(shape)


def parse_slice(name: str) -> tuple[Chip, int, str]:
    """ "v5p-512" -> (chip, number of chips, libtpu topology string)."""
    family, _, count = name.lower().partition("-")
    family = ALIASES.get(family, family)
    if family not in CHIPS or not count.isdigit() or int(count) <= 0:
        raise JaxllmError(
            f"--topology={name!r}: use a Cloud TPU slice name like v4-32, v5p-512, v5e-256, v6e-64 "
            "(or local for this machine's devices)"
        )
    chip = CHIPS[family]
    if int(count) % chip.cores_per_chip:
        raise JaxllmError(
            f"--topology={name!r}: {family} slice names count TensorCores, a multiple of {chip.cores_per_chip}"
        )
    chips = int(count) // chip.cores_per_chip
    try:
        shape = slice_shape(chips, chip.dims)
    except JaxllmError as e:
        raise JaxllmError(f"--topology={name!r}: {e}") from None
    return chip, chips, f"{chip.topology}:{'x'.join(map(str, shape))}"


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """The devices to compile for: a named slice through libtpu (`num_slices` of them over DCN), or
    `local` (this process's view of the job's devices)."""
    if topology == "local":
        if num_slices != 1:
            raise JaxllmError("--num_slices applies to a named TPU slice, not --topology=local")
        return list(jax.devices())
    chip, chips, topo = parse_slice(topology)
    if num_slices < 1:
        raise JaxllmError(f"--num_slices={num_slices} must be >= 1")
    return list(_tpu_devices(topo, chip.chip_config, chips, num_slices))


@functools.cache
def _tpu_devices(topo: str, chip_config: str, chips: int, num_slices: int) -> tuple[jax.Device, ...]:
    # Compiling needs no TPU: let libtpu load beside another process using it (a test worker, a run on
    # this TPU VM), and keep its start-up warnings about the missing TPU hosts quiet.
    for var, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(var, value)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise JaxllmError(
            f"compiling for a TPU slice needs libtpu: pip install 'jax[tpu]=={jax.__version__}' "
            "(or pip install -e '.[tpu]')"
        ) from None
    from jax.experimental import topologies

    dims = [int(d) for d in topo.split(":")[1].split("x")]
    if len(dims) == 3:  # v4 / v5p: slices of whole 4x4x4 cubes close into a torus
        wrap = tuple(d >= 4 for d in dims) if chips >= 64 else (False,) * 3
    else:  # v5e / v6e: only a full 16x16 pod wraps around
        wrap = tuple(d == 16 for d in dims)
    bounds = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo,
        chip_config_name=chip_config,
        chips_per_host_bounds=bounds,
        num_slices=num_slices,
        wrap=wrap + (False,) * (3 - len(wrap)),
    )
    return tuple(desc.devices)


def hbm_capacity(devices: Sequence[jax.Device]) -> float:
    """Bytes of memory per device: what XLA's TPU compiler says a chip has, the GPU's limit, or for CPU
    devices this machine's RAM shared among them."""
    d = devices[0]
    if d.platform == "tpu":
        return _tpu_capacity(tuple(devices[:1]))
    if d.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(len(jax.local_devices()), 1)
    stats = d.memory_stats() or {}
    return float(stats.get("bytes_limit", 0.0)) or float("inf")


@functools.cache
def _tpu_capacity(devices: tuple[jax.Device, ...]) -> float:
    """Asks the compiler: a program that cannot fit is refused with the chip's available HBM."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("x",))
    too_big = jax.ShapeDtypeStruct((2**20, 2**20), jnp.float32, sharding=NamedSharding(mesh, P()))
    try:
        jax.jit(lambda a: a + 1).lower(too_big).compile()
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        oom = OutOfMemory.parse(str(e))
        if oom is not None and oom.capacity:
            return oom.capacity
        raise
    raise RuntimeError("the TPU compiler accepted a 4 TiB program; cannot tell the chip's memory")


def _per_device_bytes(tree: Any, memory_kind: str | None = None) -> float:
    """Bytes one device holds of an abstract tree (each leaf carries its sharding), in `memory_kind`."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        s = leaf.sharding
        if memory_kind is not None and (s.memory_kind or "device") != memory_kind:
            continue
        total += math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def estimate(run, mesh_shape: dict[str, int], chips: int, devices: Sequence[jax.Device]) -> dict[str, float]:
    """An analytic step time: matmul FLOPs (with what the remat policy recomputes) at the chip's peak,
    plus the collectives each mesh axis implies at ICI/DCN bandwidth, plus offloaded activations' trips
    to host memory beyond what compute hides. FSDP gathers and gradient
    reduce-scatters are assumed to overlap compute (only their excess counts); tensor-parallel
    activation collectives sit on the critical path; the gradient all-reduce across data/slices counts
    in full. It does not model HBM bandwidth, kernel efficiency, pipeline bubbles or compiler scheduling:
    use it to rank settings, not to predict seconds."""
    m = run.model
    d, n, h, k, f, lyr = m.embed_dim, m.num_heads, m.kv_heads, m.head_size, m.mlp_dim, m.num_layers
    seq, batch = run.data.block_size, run.data.batch_size
    tokens_per_chip = batch * seq / chips
    mlp_mats = 3 if m.mlp == "swiglu" else 2
    fwd, _ = cost.forward_flops(m, seq)
    saved, offloaded = REMAT_KEEPS[m.remat]
    recomputed = [x for x in fwd if x not in saved + offloaded]
    useful = cost.model_flops_per_chip(run, chips)
    flops = useful + tokens_per_chip * lyr * sum(fwd[x] for x in recomputed)
    act_bytes = {
        "q": 2 * n * k,
        "qkv": 2 * (n + 2 * h) * k,
        "o": 2 * d,
        "mlpwi": 2 * (mlp_mats - 1) * f,
        "mlpwo": 2 * d,
    }
    host_s = 2 * lyr * tokens_per_chip * sum(act_bytes[x] for x in offloaded) / cost.HOST_BYTES_S  # out and back in
    peak = (peak_tflops(devices[0]) or 100.0) * 1e12
    compute_s = flops / peak

    chip = _chip_of(devices[0])
    ici = 2 * (chip.ici_link_bytes_s if chip else 5e10)  # a bidirectional ring along one axis
    dcn = chip.dcn_bytes_s if chip else 3e9
    data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    slices = len({getattr(x, "slice_index", 0) for x in devices})
    params = m.num_params()
    micro = run.optim.grad_accum_steps
    fsdp_bytes = micro * (2 * 2 + 4) * params / tensor * (fsdp - 1) / fsdp  # bf16 gathers fwd+bwd, f32 scatter
    local_tokens = batch * seq / (data * fsdp)  # per tensor group
    tensor_bytes = lyr * 2 * 4 * local_tokens * d * 2 * (tensor - 1) / tensor  # 4 gathers/scatters per layer pass
    grad_shard = 4 * params / (fsdp * tensor)
    data_ici = data // slices
    data_bytes = 2 * grad_shard * (data_ici - 1) / max(data_ici, 1)
    dcn_s = 2 * grad_shard * (slices - 1) / slices / dcn if slices > 1 else 0.0
    exposed = (
        max(0.0, fsdp_bytes / ici - compute_s)
        + tensor_bytes / ici
        + data_bytes / ici
        + dcn_s
        + max(0.0, host_s - compute_s)
    )
    step_s = compute_s + exposed
    return {
        "step_s": step_s,
        "compute_s": compute_s,
        "exposed_transfers_s": exposed,
        "mfu_bound": useful / peak / step_s,
        "tokens_per_s": batch * seq / step_s,
    }


# What each remat policy keeps of a layer's forward for the backward pass: (in device memory, in host
# memory); the rest of the layer's matmuls are recomputed ("core": attention itself).
_DOTS = ("qkv", "o", "mlpwi", "mlpwo")
REMAT_KEEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "none": (_DOTS + ("core",), ()),
    "save_dots": (_DOTS, ()),
    "save_dots_no_batch": (_DOTS, ()),
    "minimal": (_DOTS, ()),
    "minimal_offloaded": ((), _DOTS),
    "save_qkv_proj": (("qkv",), ()),
    "save_out_proj": (("o",), ()),
    "save_dot_except_mlp": (("qkv", "o"), ()),
    "save_dot_except_mlpwi": (("qkv", "o", "mlpwo"), ()),
    "save_dot_with_context_except_mlp": (("qkv", "o", "core"), ()),
    "qkv_proj_offloaded": ((), ("qkv",)),
    "save_dot_except_mlpwi_q_offloaded": (("qkv", "o", "mlpwo"), ("q",)),
    "full": ((), ()),
}


def _chip_of(device) -> Chip | None:
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, key in (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6", "v6e"), ("v5", "v5p"), ("v4", "v4")):
        if name in kind:
            return CHIPS[key]
    return None


def plan(
    cfg: ml_collections.ConfigDict,
    topology: str = "local",
    num_slices: int = 1,
    hbm_gib: float | None = None,
    read_cost: bool = True,
) -> dict[str, Any]:
    """Compiles the step `cfg` would run on the slice and reports its memory per chip and (`read_cost`)
    its `cost` as the compiler sees it (see `cost.step_cost`); never raises for memory (a refused step answers
    `fits: False` with the amount needed, and no cost)."""
    out, run, mesh, compiled = _compile(cfg, topology, num_slices, hbm_gib)
    if read_cost and compiled is not None:
        out["cost"] = cost.step_cost(run, mesh, compiled, out["estimate"]["step_s"])
    return out


def _compile(
    cfg: ml_collections.ConfigDict, topology: str, num_slices: int, hbm_gib: float | None
) -> tuple[dict[str, Any], Any, Any, Any]:
    """(the plan's memory report, the run, its mesh, the compiled step or None where it was refused)."""
    from jaxllm.train.start import parse

    run = parse(cfg)
    devices = topology_devices(topology, num_slices)
    mesh = shd.make_mesh(run.mesh, devices)
    shd.check_batch(run.data.batch_size, mesh, run.optim.grad_accum_steps)
    capacity = hbm_gib * GiB if hbm_gib else hbm_capacity(devices)
    program = build(run, mesh)
    state, frozen = program.abstract_state(), program.abstract_frozen()
    mesh_shape = {a: int(mesh.shape[a]) for a in shd.MESH_AXES}
    out: dict[str, Any] = {
        "topology": topology if num_slices == 1 else f"{num_slices}x {topology}",
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "mesh": mesh_shape,
        "global_batch": run.data.batch_size,
        "seq_len": run.data.block_size,
        "per_chip_batch": run.data.batch_size / len(devices),
        "params": run.model.num_params(),
        "remat": run.model.remat,
        "grad_accum_steps": run.optim.grad_accum_steps,
        "attention": run.model.attention,
        "loss_chunk": run.train.loss_chunk,
        "hbm_capacity_gib": capacity / GiB,
        "objective": run.train.objective,
        "reference": program.reference.kind if program.reference is not None else None,
    }
    breakdown = {
        "params_gib": _per_device_bytes(state.params, "device") / GiB,
        "opt_state_gib": _per_device_bytes(state.opt_state, "device") / GiB,
        "frozen_base_gib": _per_device_bytes(frozen, "device") / GiB,
        "reference_gib": _per_device_bytes(program.abstract_ref(), "device") / GiB,  # a DPO reference's own params
        "batch_gib": _per_device_bytes(program.abstract_batch()) / GiB,
        "host_state_gib": _per_device_bytes(state, "pinned_host") / GiB,
    }
    t0 = time.perf_counter()
    try:
        compiled = program.compile_train_step()
    except jax.errors.JaxRuntimeError as e:
        raise JaxllmError(
            f"the compiler refused the step for {out['topology']}: {str(e).strip().splitlines()[0]}"
        ) from None
    except OutOfMemory as e:
        out["compile_s"] = time.perf_counter() - t0
        args = sum(v for k, v in breakdown.items() if k != "host_state_gib")
        needed = (e.needed / GiB + (args if "temporaries" in str(e) else 0.0)) if e.needed else None
        out.update(
            fits=False,
            hbm_per_chip_gib=needed,
            headroom_gib=None if needed is None else capacity / GiB - needed,
            breakdown=breakdown,
            compiler=str(e),
        )
        if e.capacity:
            out["hbm_capacity_gib"] = e.capacity / GiB
        out["estimate"] = estimate(run, mesh_shape, len(devices), devices)
        return out, run, mesh, None
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    breakdown.update(
        temporaries_gib=mem.temp_size_in_bytes / GiB,
        outputs_not_aliased_gib=(mem.output_size_in_bytes - mem.alias_size_in_bytes) / GiB,
        host_temporaries_gib=getattr(mem, "host_temp_size_in_bytes", 0) / GiB,
    )
    out["host_arguments_gib"] = getattr(mem, "host_argument_size_in_bytes", 0) / GiB
    out.update(
        fits=total <= capacity,
        hbm_per_chip_gib=total / GiB,
        headroom_gib=(capacity - total) / GiB,
        breakdown=breakdown,
        estimate=estimate(run, mesh_shape, len(devices), devices),
    )
    return out, run, mesh, compiled


# ----------------------------------------------------------------------------------------------- search

REMAT_BY_MEMORY = (
    "none",
    "minimal",
    "save_dot_except_mlpwi",
    "save_dot_with_context_except_mlp",
    "save_dot_except_mlp",
    "save_qkv_proj",
    "full",
)  # most saved first


def candidates(run, chips: int, num_slices: int = 1) -> list[dict[str, Any]]:
    """Settings to try: meshes (tensor 1-8 dividing the heads, data a multiple of the slices, fsdp the
    rest), every remat policy in REMAT_BY_MEMORY, and micro-batches that keep >= 1 sequence per device."""
    m, batch = run.model, run.data.batch_size
    out = []
    for tensor in (1, 2, 4, 8):
        if chips % tensor or m.num_heads % tensor or m.mlp_dim % tensor:
            continue
        rest = chips // tensor
        data = num_slices
        while data <= rest:
            if rest % data == 0 and data % num_slices == 0:
                fsdp = rest // data
                for accum in (1, 2, 4, 8, 16):
                    per_device = batch / accum / (data * fsdp)
                    if batch % accum or per_device < 1 or per_device != int(per_device):
                        continue
                    for remat in REMAT_BY_MEMORY:
                        out.append(
                            dict(mesh=dict(data=data, fsdp=fsdp, tensor=tensor), remat=remat, grad_accum_steps=accum)
                        )
            data *= 2
    return out


def overrides(c: dict[str, Any]) -> list[str]:
    mesh = c["mesh"]
    return [
        f"mesh.data={mesh['data']}",
        f"mesh.fsdp={mesh['fsdp']}",
        f"mesh.tensor={mesh['tensor']}",
        f"model.remat={c['remat']}",
        f"optim.grad_accum_steps={c['grad_accum_steps']}",
    ]


def _with(cfg: ml_collections.ConfigDict, items: list[str]) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(cfg.to_dict())
    for item in items:
        apply_override(out, item)
    return out


def search(
    cfg: ml_collections.ConfigDict,
    topology: str = "local",
    num_slices: int = 1,
    hbm_gib: float | None = None,
    max_compiles: int = 8,
    log=print,
) -> dict[str, Any]:
    """The fastest setting that fits among up to `max_compiles` compiled: candidates are compiled in the
    order of the analytic `estimate`, and each that fits is timed by its compiled cost (`cost.step_cost`'s
    `estimated_step_s`: the TPU compiler's `optimal_seconds` plus host transfers it cannot hide). Skipped
    without compiling: settings that cannot fit because one keeping no more in memory did not (same
    mesh, a remat policy saving at least as much, no more micro-batches), and settings that save more
    memory than one that fits (they recompute or re-gather more, so they are not faster). Where the
    compiler gives no time (CPU devices) the analytic order decides: the first setting that fits."""
    from jaxllm.train.start import parse

    run = parse(cfg)
    devices = topology_devices(topology, num_slices)
    ranked = []
    for c in candidates(run, len(devices), num_slices):
        trial = parse(_with(cfg, overrides(c)))
        ranked.append((estimate(trial, c["mesh"], len(devices), devices)["step_s"], c))
    ranked.sort(key=lambda x: x[0])
    failed: list[dict[str, Any]] = []
    fitted: list[dict[str, Any]] = []
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], list[str]] | None = None
    for analytic_s, c in ranked:
        if len(tried) >= max_compiles:
            break
        if any(_dominated(c, f) for f in failed) or any(_dominated(f, c) for f in fitted):
            continue
        result, trial, mesh, compiled = _compile(_with(cfg, overrides(c)), topology, num_slices, hbm_gib)
        step_s = None
        if result["fits"]:
            result["cost"] = cost.step_cost(trial, mesh, compiled, result["estimate"]["step_s"])
            step_s = result["cost"]["estimated_step_s"]
        del compiled
        tried.append(
            {
                "overrides": overrides(c),
                "fits": result["fits"],
                "hbm_per_chip_gib": result["hbm_per_chip_gib"],
                "analytic_step_s": analytic_s,
                "estimated_step_s": step_s,
            }
        )
        log(
            f"  {' '.join(overrides(c))}: {_gib(result['hbm_per_chip_gib'])} per chip, "
            + (f"fits, compiled estimate {step_s:.3g} s/step" if result["fits"] else "does not fit")
            + f" (analytic {analytic_s:.3g} s/step)"
        )
        if not result["fits"]:
            failed.append(c)
            continue
        fitted.append(c)
        if best is None or step_s < best[0]:
            best = (step_s, result, overrides(c))
        if result["cost"]["optimal_seconds"] is None:  # no compiled time: the analytic order already ranks
            break
    return {"best": best[1] if best else None, "overrides": best[2] if best else None, "tried": tried}


def _dominated(c: dict[str, Any], other: dict[str, Any]) -> bool:
    """`c` keeps at least as much in memory as `other` (and recomputes no more)."""
    return (
        c["mesh"] == other["mesh"]
        and c["grad_accum_steps"] <= other["grad_accum_steps"]
        and REMAT_BY_MEMORY.index(c["remat"]) <= REMAT_BY_MEMORY.index(other["remat"])
    )


def _gib(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f} GiB"


def table(result: dict[str, Any]) -> str:
    """A plan as a readable table."""
    b = result["breakdown"]
    est = result.get("estimate") or {}
    rows = [
        ("topology", f"{result['topology']} ({result['chips']} x {result['device_kind']})"),
        ("mesh", " ".join(f"{k}={v}" for k, v in result["mesh"].items())),
        (
            "batch",
            f"{result['global_batch']} x {result['seq_len']} tokens ({result['per_chip_batch']:g} sequences "
            f"per chip), grad_accum_steps={result['grad_accum_steps']}",
        ),
        (
            "model",
            f"{result['params']:,} params, remat={result['remat']}, attention={result['attention']}, "
            f"loss_chunk={result['loss_chunk']}",
        ),
        (
            "fits",
            f"{'yes' if result['fits'] else 'NO'}: {_gib(result['hbm_per_chip_gib'])} of "
            f"{result['hbm_capacity_gib']:.1f} GiB per chip",
        ),
        ("  params", _gib(b["params_gib"])),
        (
            "  optimizer state",
            _gib(b["opt_state_gib"])
            + (f" (+{b['host_state_gib']:.1f} GiB in host memory)" if b["host_state_gib"] else ""),
        ),
        ("  frozen base", _gib(b["frozen_base_gib"])),
        ("  batch", _gib(b["batch_gib"])),
        ("  activations, gradients, temporaries", _gib(b.get("temporaries_gib"))),
        ("compile", f"{result['compile_s']:.0f} s"),
    ]
    if est:
        rows.append(
            (
                "estimate",
                f">= {est['step_s']:.2f} s/step, MFU <= {100 * est['mfu_bound']:.0f}% (analytic bound: "
                "FLOPs at peak plus exposed collectives)",
            )
        )
    rows += cost.table_rows(result.get("cost"))
    if not result["fits"] and "compiler" in result:
        rows.append(("compiler", result["compiler"][:300]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
