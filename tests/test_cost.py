"""`jaxllm plan`'s cost of a step as the compiler sees it (`jaxllm.cost`): flops and collectives of programs
whose figures are known, loop trip counts, the HLO reader, a small model's cost (scanned layers
extrapolated against the unrolled step), and `--search` ranking by the compiled estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_plan import SMALL, _plan

from jaxllm import cost
from jaxllm import plan as pl
from jaxllm.config import load_config


def test_search_on_a_tpu_slice_ranks_by_the_compiled_cost():
    """Everything fits a v5p chip, so the search goes on after the first fit: it compiles 3 settings
    (none keeping less in memory than one that fit on the same mesh) and returns the one the compiler
    times fastest."""
    cfg = load_config("configs/tiny.py", SMALL[:-1] + ["model.scan_layers=False"])
    found = pl.search(cfg, "v5p-8", max_compiles=3, log=lambda line: None)
    tried = found["tried"]
    assert len(tried) == 3 and all(t["fits"] for t in tried)
    meshes = [t["overrides"][:3] for t in tried]
    assert len(set(map(tuple, meshes))) == 3  # one setting per mesh: the rest save memory that is not needed
    fastest = min(tried, key=lambda t: t["estimated_step_s"])
    assert found["overrides"] == fastest["overrides"]
    assert found["best"]["cost"]["estimated_step_s"] == fastest["estimated_step_s"]
    assert found["best"]["cost"]["method"] == "unrolled program"


B, D, F = 256, 512, 1024  # x[B, D] split over 4 chips' batch, w[D, F] split over D


def _matmul(x, w):
    return jnp.dot(x, w, precision="highest")


def _split(topology):
    mesh = Mesh(np.asarray(pl.topology_devices(topology)[:4]), ("x",))
    return NamedSharding(mesh, P("x", None))


@pytest.mark.parametrize("topology", ["v5p-8", "local"])
def test_a_matmul_whose_weight_must_be_gathered(topology):
    """Each chip multiplies its quarter of the batch by the whole w, so it all-gathers w and does a
    quarter of the product's FLOPs (float32 at full precision: the TPU would otherwise gather w in
    bfloat16, the CPU a bfloat16 w in float32)."""
    split = _split(topology)
    x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=split)
    w = jax.ShapeDtypeStruct((D, F), jnp.float32, sharding=split)
    got = cost.read(jax.jit(_matmul, out_shardings=split).lower(x, w).compile())
    assert got["collective_bytes"] == {**dict.fromkeys(cost.KINDS, 0.0), "all-gather": D * F * 4}
    assert got["flops"] == 2 * B * D * F / 4
    assert (got["optimal_seconds"] is None) == (topology == "local")  # the TPU compiler's estimate only


@pytest.mark.parametrize("topology", ["v5p-8", "local"])
def test_collectives_in_loops_count_every_trip(topology):
    """w is rescaled (and kept split) on every trip of nested fori_loops, so each trip gathers it again:
    3 x 5 gathers. The cost analysis counts a loop body once (why scanned layers are extrapolated)."""
    split = _split(topology)

    def loops(x, w, outer, inner):
        def step(i, carry):
            y, w = carry
            w = jax.lax.with_sharding_constraint(w * 1.5, split)
            return jnp.tanh(_matmul(y, w)), w

        return jax.lax.fori_loop(0, outer, lambda j, c: jax.lax.fori_loop(0, inner, step, c), (x, w))[0]

    x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=split)
    w = jax.ShapeDtypeStruct((D, D), jnp.float32, sharding=split)
    once, nested = (
        cost.read(jax.jit(lambda x, w: loops(x, w, *trips), out_shardings=split).lower(x, w).compile())
        for trips in ((1, 1), (3, 5))
    )
    assert once["collective_bytes"]["all-gather"] == D * D * 4
    assert nested["collective_bytes"]["all-gather"] == 15 * D * D * 4 and nested["unknown_trip_counts"] == 0
    assert nested["flops"] == pytest.approx(once["flops"]) == pytest.approx(2 * B * D * D / 4, rel=0.01)


def test_hlo_text_is_read_with_its_tuples_fusions_and_host_copies():
    """The forms the TPU compiler writes: an async all-gather (counted once, at -done), its
    all-reduce-scatter fusion (a reduce-scatter of its result's size), a copy to host memory S(5), and a
    loop whose trip count comes from its condition (i < 4, i from 0)."""
    text = """HloModule m

%ars (p: bf16[1024,256]) -> bf16[256,256] {
  %p = bf16[1024,256]{1,0} parameter(0)
  %all-reduce.1 = bf16[1024,256]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = bf16[256,256]{1,0} dynamic-slice(%all-reduce.1, %c, %c), dynamic_slice_sizes={256,256}
}

%body (t: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %t = (s32[], f32[64,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[64,128]{1,0} get-tuple-element(%t), index=1
  %ags = (f32[16,128]{1,0}, f32[64,128]{1,0}) all-gather-start(%v), dimensions={0}
  %agd = f32[64,128]{1,0} all-gather-done(%ags)
  %cs = (f32[64,128]{1,0:T(8,128)S(5)}, f32[64,128]{1,0}, u32[]{:S(2)}) copy-start(%agd)
  %cd = f32[64,128]{1,0:T(8,128)S(5)} copy-done(%cs)
  ROOT %r = (s32[], f32[64,128]{1,0}) tuple(%i, %agd)
}

%cond (t.1: (s32[], f32[64,128])) -> pred[] {
  %t.1 = (s32[], /*index=1*/f32[64,128]{1,0}) parameter(0)
  %four = s32[] constant(4)
  %j = s32[] get-tuple-element(%t.1), index=0
  ROOT %lt = pred[] compare(%j, %four), direction=LT
}

ENTRY %main (a: bf16[1024,256], b: f32[64,128]) -> bf16[256,256] {
  %a = bf16[1024,256]{1,0} parameter(0)
  %b = f32[64,128]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %init = (s32[], f32[64,128]{1,0}) tuple(%start, %b)
  %loop = (s32[], f32[64,128]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %f = bf16[256,256]{1,0} fusion(%a), kind=kCustom, calls=%ars
}
"""
    counts = cost.count(text)
    assert counts.collectives == {"all-gather": 4 * 64 * 128 * 4, "reduce-scatter": 256 * 256 * 2}
    assert counts.to_host == 4 * 64 * 128 * 4 and counts.to_device == 0 and counts.unknown_trip_counts == 0
    assert cost.collective_bytes(text.replace("constant(4)", "constant(7)"))["all-gather"] == 7 * 64 * 128 * 4
    unknown = cost.count(text.replace("%start = s32[] copy(%zero)", "%start = s32[] parameter(2)"))
    assert unknown.unknown_trip_counts == 1 and unknown.collectives["all-gather"] == 64 * 128 * 4


XLA4 = ("model.attention=xla", "model.num_layers=4")


@pytest.fixture(scope="module")
def unrolled4():
    return _plan(*XLA4, "model.scan_layers=False", read_cost=True)


def test_scanned_layers_extrapolate_to_the_unrolled_programs_cost(unrolled4):
    """4 scanned layers, their cost extrapolated from 1 and 2 unrolled ones, against the 4 layers
    compiled unrolled; collectives are the scanned program's own (loop trips counted)."""
    scanned = _plan(*XLA4, read_cost=True)["cost"]
    whole = unrolled4["cost"]
    assert scanned["method"].startswith("extrapolated") and whole["method"] == "unrolled program"
    for key in ("flops_per_chip", "bytes_accessed_per_chip", "optimal_seconds"):
        assert scanned[key] == pytest.approx(whole[key], rel=0.03), key
    assert scanned["model_flops_per_chip"] == whole["model_flops_per_chip"]
    # The scanned program is its own schedule: each layer's gradients are reduce-scattered once either way,
    # while its loops gather the attention weights once more per layer than the unrolled step does.
    got, want = scanned["collective_bytes"], whole["collective_bytes"]
    assert got["reduce-scatter"] == want["reduce-scatter"] > 0
    assert got["all-reduce"] == pytest.approx(want["all-reduce"], rel=0.01)
    layer_bf16 = 2 * (256 * (4 + 2) * 64 * 2 + 3 * 256 * 1024)  # q, k, v, o and the MLP's three matrices
    assert want["all-gather"] == 2 * 4 * layer_bf16  # forward and backward, 4 layers
    assert 2 * 4 * layer_bf16 <= got["all-gather"] <= 3 * 4 * layer_bf16


def test_the_remat_policy_shows_as_recomputed_flops(unrolled4):
    """With XLA's blockwise attention (which the cost analysis counts, unlike a Pallas kernel) the compiled
    step does at least the model's flops; full remat recomputes the layers' forward (a quarter more)."""
    full = _plan(*XLA4, "model.scan_layers=False", "model.remat=full", read_cost=True)["cost"]
    none = unrolled4["cost"]
    assert none["model_flops_per_chip"] <= none["flops_per_chip"] and none["kernel_calls"] == 0
    assert full["recompute_share"] > none["recompute_share"] + 0.1
    assert full["model_flops_per_chip"] == none["model_flops_per_chip"]
