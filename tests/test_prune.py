"""Magnitude pruning: exact thresholds (vs a numpy sort), cubic schedule, masks that stay applied under AdamW,
per-layer slices of scanned leaves, equality across meshes, and Orbax checkpointing of the masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import JaxllmError
from jaxllm import sharding as shd
from jaxllm.config import build
from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.train import prune as pr
from jaxllm.train import step as st
from jaxllm.train.optimizer import OptimConfig, make_optimizer

CFG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32, max_seq_len=16, dtype="float32")
L = 8


def _tree(seed=0, scale=1.0):
    rs = np.random.RandomState(seed)
    n = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32) * scale)  # noqa: E731
    return {
        "a": {"kernel": n(8, 16)},
        "b": {"proj": {"kernel": n(3, 50, 7)}},
        "norm": {"scale": n(16)},
        "embed": {"embedding": n(10, 4)},
    }


def _targeted(tree):
    return [tree["a"]["kernel"], tree["b"]["proj"]["kernel"]]


def _smallest_mask(values, k):
    """Reference: True where the entry is among the k smallest |values| (numpy sort over all of them)."""
    flat = np.concatenate([np.abs(np.asarray(v)).ravel() for v in values])
    pruned = np.zeros(flat.size, bool)
    pruned[np.argsort(flat, kind="stable")[:k]] = True
    out, start = [], 0
    for v in values:
        out.append(pruned[start : start + v.size].reshape(v.shape))
        start += v.size
    return out


@pytest.mark.parametrize("target", [0.5, 0.37])
def test_one_shot_global_zeroes_exactly_the_smallest(target):
    params = _tree()
    cfg = pr.PruneConfig(sparsity=target)
    n = sum(v.size for v in _targeted(params))
    want = _smallest_mask(_targeted(params), int(np.round(np.float32(target) * n)))
    pruned, masks = pr.prune_now(params, cfg)
    for got, w, m in zip(_targeted(pruned), want, _targeted(masks)):
        np.testing.assert_array_equal(np.asarray(got) == 0, w)
        np.testing.assert_array_equal(~np.asarray(m), w)
    assert abs(float(pr.sparsity(pruned, cfg)) - target) < 1e-3
    np.testing.assert_array_equal(pruned["norm"]["scale"], params["norm"]["scale"])
    np.testing.assert_array_equal(pruned["embed"]["embedding"], params["embed"]["embedding"])
    assert isinstance(masks["norm"]["scale"], optax.MaskedNode)

    # as the last transform: the mask comes from the would-be params, params + updates
    updates = _tree(seed=1, scale=0.5)
    tx = pr.magnitude_pruning(cfg)
    out, state = jax.jit(tx.update)(updates, tx.init(params), params)
    new = optax.apply_updates(params, out)
    would_be = jax.tree.map(jnp.add, params, updates)
    want = _smallest_mask(_targeted(would_be), int(np.round(np.float32(target) * n)))
    for got, wb, w in zip(_targeted(new), _targeted(would_be), want):
        np.testing.assert_array_equal(np.asarray(got) == 0, w)
        np.testing.assert_array_equal(np.asarray(got)[~w], np.asarray(wb)[~w])
    np.testing.assert_array_equal(new["norm"]["scale"], would_be["norm"]["scale"])
    assert int(state.count) == 1


def test_layer_scope_prunes_each_matrix_and_each_scanned_slice():
    rs = np.random.RandomState(0)
    stacked = rs.randn(3, 8, 16).astype(np.float32) * np.array([100.0, 1.0, 0.01], np.float32)[:, None, None]
    params = {
        "layers": {"mlp": {"kernel": jnp.asarray(stacked)}},
        "lm_head": {"kernel": jnp.asarray(rs.randn(8, 12).astype(np.float32))},
    }
    cfg = pr.PruneConfig(sparsity=0.75, scope="layer")
    pruned, _ = pr.prune_now(params, cfg)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(pruned["layers"]["mlp"]["kernel"][i]) == 0, _smallest_mask([stacked[i]], 96)[0]
        )
    np.testing.assert_array_equal(
        np.asarray(pruned["lm_head"]["kernel"]) == 0, _smallest_mask([params["lm_head"]["kernel"]], 72)[0]
    )
    # a global threshold would have spared the large layer and emptied the small one
    glob, _ = pr.prune_now(params, pr.PruneConfig(sparsity=0.75))
    zeros = np.mean(np.asarray(glob["layers"]["mlp"]["kernel"]) == 0, axis=(1, 2))
    assert zeros[0] < 0.1 and zeros[2] == 1.0

    # the real scanned decoder: every layer slice of every matrix gets the target
    real = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    pruned, _ = pr.prune_now(real, pr.PruneConfig(sparsity=0.6, scope="layer"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(pruned)[0]:
        names = [k.key for k in path]
        if names[-1] == "kernel":
            slices = leaf if names[0] == "layers" else leaf[None]
            for s in np.asarray(slices):
                assert abs(np.mean(s == 0) - 0.6) <= 0.5 / s.size + 1e-6, names


def test_cubic_schedule():
    cfg = pr.PruneConfig(sparsity=0.8, start_step=10, end_step=110, every=25)
    steps = jnp.array([0, 9, 10, 35, 60, 85, 110, 500])
    want = [0, 0, 0, 0.8 * (1 - 0.75**3), 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.25**3), 0.8, 0.8]
    np.testing.assert_allclose(pr.sparsity_at(cfg, steps), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        pr.is_prune_step(cfg, jnp.arange(130)), np.isin(np.arange(130), [10, 35, 60, 85, 110])
    )
    uneven = pr.PruneConfig(sparsity=0.8, start_step=0, end_step=50, every=20)
    assert np.flatnonzero(pr.is_prune_step(uneven, jnp.arange(60))).tolist() == [0, 20, 40, 50]
    one_shot = pr.PruneConfig(sparsity=0.5, start_step=7)
    np.testing.assert_allclose(pr.sparsity_at(one_shot, jnp.array([0, 6, 7, 100])), [0, 0, 0.5, 0.5])
    assert np.flatnonzero(pr.is_prune_step(one_shot, jnp.arange(20))).tolist() == [7]


def _train(params, tx, steps, seed=0):
    """`steps` AdamW(+pruning) updates with random gradients; returns params and masks after each."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    keys = jax.random.split(jax.random.key(seed), steps)
    history = []
    for key in keys:
        leaves, treedef = jax.tree.flatten(params)
        grads = treedef.unflatten(
            [jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(key, len(leaves)), leaves)]
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((params, state[-1].masks))  # pruning: the last state
    return history


def test_pruned_entries_stay_zero_under_adamw_and_the_rest_move():
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1), 100)
    tx = pr.with_pruning(tx, pr.PruneConfig(sparsity=0.5))
    history = _train(_tree(), tx, 6)
    first = history[0][0]
    zero = [np.asarray(k) == 0 for k in _targeted(first)]
    assert sum(z.sum() for z in zero) == sum(z.size for z in zero) // 2
    prev = first
    for params, _ in history[1:]:
        for z, k, p in zip(zero, _targeted(params), _targeted(prev)):
            k, p = np.asarray(k), np.asarray(p)
            assert np.all(k[z] == 0) and np.all(k[~z] != p[~z])
        assert not np.any(np.asarray(params["norm"]["scale"]) == np.asarray(prev["norm"]["scale"]))
        prev = params


def test_gradual_masks_only_grow_and_reach_the_target():
    cfg = pr.PruneConfig(sparsity=0.6, start_step=2, end_step=12, every=3)
    # plain SGD with unit random gradients: a pruned weight's would-be value (one fresh step) often beats
    # the smallest kept weights, so it would come back if masks were recomputed from scratch
    history = _train(_tree(scale=0.01), pr.with_pruning(optax.sgd(1.0), cfg), 16)
    n = sum(v.size for v in _targeted(history[0][0]))
    prev_kept, prev_want = [np.ones(v.shape, bool) for v in _targeted(history[0][0])], 0
    for step, (params, masks) in enumerate(history):
        kept = [np.asarray(m) for m in _targeted(masks)]
        assert all(np.all(k <= p) for k, p in zip(kept, prev_kept)), step  # kept sets only shrink
        last = max(s for s in (2, 5, 8, 11, 12) if s <= step) if step >= 2 else 0  # mask updates
        want = int(np.round(np.float32(pr.sparsity_at(cfg, last)) * n))
        assert sum((~k).sum() for k in kept) == want, step
        changed = any(np.any(k != p) for k, p in zip(kept, prev_kept))
        assert changed == (want > prev_want), step  # nothing moves between mask updates
        assert all(np.all(np.asarray(v)[~k] == 0) for v, k in zip(_targeted(params), kept))
        prev_kept, prev_want = kept, want
    assert abs(float(pr.sparsity(history[-1][0], cfg)) - 0.6) < 1e-3


def test_targets_select_only_the_intended_leaves():
    params = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    for regex, hit in [
        ("kernel", lambda names: names[-1] == "kernel"),
        ("mlp/.*", lambda names: "mlp" in names),
        ("self_attn/(q|k)_proj/kernel", lambda names: names[-2] in ("q_proj", "k_proj")),
    ]:
        pruned, masks = pr.prune_now(params, pr.PruneConfig(sparsity=0.5, targets=regex))
        flat_m = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
        for (path, m), before, after in zip(flat_m, jax.tree.leaves(params), jax.tree.leaves(pruned)):
            names = [k.key for k in path]
            if hit(names):
                assert m.shape == before.shape and 0.3 < np.mean(np.asarray(after) == 0) < 0.7, (regex, names)
            else:
                assert isinstance(m, optax.MaskedNode), (regex, names)
                np.testing.assert_array_equal(after, before)
    with pytest.raises(JaxllmError, match="prune.targets"):
        pr.magnitude_pruning(pr.PruneConfig(sparsity=0.5, targets="nothing_here")).init(params)


def _sharded_run(mesh, tmp_path=None):
    model = Decoder(CFG)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
    tx = pr.with_pruning(tx, pr.PruneConfig(sparsity=0.5, start_step=1))
    state, shardings = st.init_state(model, tx, mesh, jax.random.key(0))
    fn = st.jit_train_step(st.make_train_step(model, tx, schedule, st.StepConfig()), shardings, mesh)
    rs = np.random.RandomState(0)
    for _ in range(3):
        batch = dict(
            inputs=rs.randint(0, 64, (8, L)).astype(np.int32),
            targets=rs.randint(0, 64, (8, L)).astype(np.int32),
            segment_ids=np.ones((8, L), np.int32),
            positions=np.tile(np.arange(L, dtype=np.int32), (8, 1)),
            loss_weights=np.ones((8, L), np.float32),
        )
        state, _ = fn(state, shd.global_batch(batch, mesh))
    return state, shardings, model, tx


def test_sharded_equals_unsharded_and_masks_checkpoint(tmp_path):

    from jaxllm.train.checkpoint import (
        CheckpointConfig,
        Checkpointer,
    )

    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=8, tensor=1))
    state, shardings, model, tx = _sharded_run(mesh)
    ref, _, _, _ = _sharded_run(shd.make_mesh(shd.MeshConfig(), jax.devices()[:1]))
    masks = state.opt_state[-1].masks
    kernel = state.params["layers"]["mlp"]["up_proj"]["kernel"]
    mask = masks["layers"]["mlp"]["up_proj"]["kernel"]
    assert "fsdp" in kernel.sharding.spec and mask.sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
    for a, b in zip(jax.tree.leaves(state.opt_state[-1]), jax.tree.leaves(ref.opt_state[-1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
    cfg = pr.PruneConfig(sparsity=0.5)
    assert abs(float(pr.sparsity(state.params, cfg)) - 0.5) < 1e-3
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(pr.prune_now(state.params, cfg)[1])):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(p))  # already pruned: the same cut again

    ckpt = Checkpointer(str(tmp_path / "ckpt"), CheckpointConfig(async_save=False))
    ckpt.save(3, state)
    abstract = shd.placed(st.abstract_state(model, tx), shardings)
    restored = ckpt.restore(abstract)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored.opt_state[-1]), jax.tree.leaves(state.opt_state[-1])):
        assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "values, key",
    [
        (dict(sparsity=1.0), "prune.sparsity"),
        (dict(sparsity=-0.1), "prune.sparsity"),
        (dict(scope="row"), "prune.scope"),
        (dict(every=0), "prune.every"),
        (dict(start_step=-1), "prune.start_step"),
        (dict(targets="(kernel"), "prune.targets"),
        (dict(sparsty=0.5), "prune.sparsity"),
        (dict(sparsity="half"), "prune.sparsity"),
    ],
)
def test_bad_config_values_raise(values, key):
    with pytest.raises(JaxllmError, match=key.replace(".", r"\.")) as e:
        build(pr.PruneConfig, values, "prune")
    assert "\n" not in str(e.value)


def test_off_leaves_the_optimizer_alone():
    tx, _ = make_optimizer(OptimConfig(), 10)
    assert pr.with_pruning(tx, build(pr.PruneConfig, {}, "prune")) is tx
    assert pr.with_pruning(tx, build(pr.PruneConfig, {"sparsity": 0}, "prune")) is tx
    assert pr.with_pruning(tx, pr.PruneConfig(sparsity=0.5)) is not tx
