"""MambaLM: recurrent path vs parallel forward, initialisation, presets, validation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

import mamba_jax as mj


def _model(seed=0, **cfg):
    config = mj.MambaConfig.tiny(**{"vocab_size": 97, **cfg})
    return mj.MambaLM(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("selective", [True, False])
def test_recurrent_path_equals_parallel_forward(selective):
    model = _model(selective=selective)
    ids = jax.random.randint(jax.random.key(1), (2, 90), 0, 97)
    full = model(ids)  # l = 90 > 64: the parallel path uses the chunked scan
    cache = model.init_cache(2)
    outs, pos = [], 0
    for size in (40, 3, 1, 30, 1, 1, 14):  # prefill in uneven chunks, then one-token steps
        logits, cache = model(ids[:, pos : pos + size], cache=cache)
        outs.append(logits)
        pos += size
    assert pos == 90
    assert rel_err(jnp.concatenate(outs, axis=1), full) < 1e-5


def test_one_token_step_has_constant_cost_in_context():
    """The cache has the same shapes whatever the context length, so the jitted
    step is the same computation (no recompilation, no growth)."""
    model = _model()
    traces = []

    @nnx.jit
    def step(m, ids, c):
        traces.append(1)
        return m(ids, cache=c)

    cache = model.init_cache(1)
    shapes = jax.tree.map(jnp.shape, cache)
    ids = jnp.array([[5]], jnp.int32)
    for _ in range(4):
        _, cache = step(model, ids, cache)
    assert len(traces) == 1
    assert jax.tree.map(jnp.shape, cache) == shapes
    cfg = model.config
    expected = cfg.n_layer * (cfg.d_inner * (cfg.d_conv - 1) * 4 + cfg.d_inner * cfg.d_state * 4)
    assert cache.nbytes() == expected


def test_bfloat16_compute_close_to_float32():
    ids = jax.random.randint(jax.random.key(2), (2, 33), 0, 97)
    f32 = _model()(ids)
    m16 = mj.MambaLM(mj.MambaConfig.tiny(vocab_size=97), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = m16(ids)
    assert out.dtype == jnp.bfloat16
    assert m16.layers[0].mixer.in_proj.kernel[...].dtype == jnp.float32  # stored in float32
    assert rel_err(out, f32) < 3e-2


def test_gradients_flow_to_every_parameter():
    model = _model()
    ids = jax.random.randint(jax.random.key(3), (2, 20), 0, 97)

    def loss(m):
        logits = m(ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        assert np.all(np.isfinite(g)), path
        assert float(jnp.abs(g).max()) > 0, path


def test_initialisation_follows_the_reference():
    cfg = mj.MambaConfig(d_model=256, n_layer=4, vocab_size=1000, dt_min=0.001, dt_max=0.1)
    m = mj.MambaLM(cfg, rngs=nnx.Rngs(0))
    mixer = m.layers[1].mixer
    d, n, r, e = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.d_model
    assert r == 16 and d == 512
    np.testing.assert_allclose(mixer.A_log[...], np.log(np.tile(np.arange(1, n + 1), (d, 1))), rtol=1e-6)
    np.testing.assert_array_equal(mixer.D[...], np.ones(d))
    dt = np.asarray(jax.nn.softplus(mixer.dt_proj.bias[...]))
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    log_dt = np.log(dt)  # log-uniform: uniform in log space
    assert abs(log_dt.mean() - (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2) < 0.3
    assert abs(log_dt.std() - (math.log(cfg.dt_max) - math.log(cfg.dt_min)) / math.sqrt(12)) < 0.15
    w = np.asarray(mixer.dt_proj.kernel[...])
    assert np.abs(w).max() <= r**-0.5 and w.std() > 0.8 * r**-0.5 / math.sqrt(3)
    emb = np.asarray(m.embedding.embedding[...])
    assert emb.shape == (1000, e) and abs(emb.std() - 0.02) < 0.002
    for kernel, bound in (
        (mixer.in_proj.kernel, 1 / math.sqrt(e)),
        (mixer.x_proj.kernel, 1 / math.sqrt(d)),
        (mixer.out_proj.kernel, 1 / math.sqrt(d) / math.sqrt(cfg.n_layer)),
        (mixer.conv1d.kernel, 1 / math.sqrt(cfg.d_conv)),
    ):
        k = np.asarray(kernel[...])
        assert np.abs(k).max() <= bound and k.std() > 0.9 * bound / math.sqrt(3)
    assert mixer.in_proj.bias is None and mixer.conv1d.bias is not None
    np.testing.assert_array_equal(m.norm_f.weight[...], np.ones(e))


def _count(config):
    abstract = nnx.eval_shape(lambda: mj.MambaLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _formula(cfg):
    e, d, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv
    mixer = e * 2 * d + d * k + d + d * (r + 2 * n) + r * d + d + d * n + d + d * e
    return cfg.padded_vocab_size * e + cfg.n_layer * (mixer + e) + e


@pytest.mark.parametrize(
    "preset,layers,width",
    [("mamba_130m", 24, 768), ("mamba_370m", 48, 1024), ("mamba_790m", 48, 1536), ("mamba_1_4b", 48, 2048), ("mamba_2_8b", 64, 2560)],
)
def test_presets_parameter_counts(preset, layers, width):
    cfg = getattr(mj.MambaConfig, preset)()
    assert (cfg.n_layer, cfg.d_model, cfg.padded_vocab_size, cfg.d_state, cfg.d_conv, cfg.expand) == (layers, width, 50280, 16, 4, 2)
    assert cfg.resolved_dt_rank == math.ceil(width / 16)
    assert _count(cfg) == _formula(cfg)
    if preset == "mamba_130m":
        assert _count(cfg) == 129_135_360  # the reference state-spaces/mamba-130m


def test_untied_head_and_vocab_padding():
    cfg = mj.MambaConfig.tiny(vocab_size=50, pad_vocab_size_multiple=16, tie_embeddings=False)
    assert cfg.padded_vocab_size == 64
    m = mj.MambaLM(cfg, rngs=nnx.Rngs(0))
    assert m.lm_head.kernel[...].shape == (64, 64)
    assert m(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 64)


def test_every_parameter_has_logical_axes():
    m = _model(selective=True)
    lti = _model(selective=False)
    for model in (m, lti):
        for path, p in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            axes = p.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == p[...].ndim, path
    spec = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(spec["layers"][0]["mixer"]["in_proj"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(spec["embedding"]["embedding"].get_value()) == ("vocab", "embed")


def test_bad_inputs_raise():
    m = _model()
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        m(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(b, l\)"):
        m(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 104\)"):
        m(jnp.array([[1, 104]], jnp.int32))
    with pytest.raises(ValueError, match="cache has batch size 2"):
        m(jnp.zeros((1, 4), jnp.int32), cache=m.init_cache(2))
    with pytest.raises(ValueError, match="batch_size=0 must be a positive int"):
        m.init_cache(0)
    with pytest.raises(ValueError, match="MambaConfig.d_model=0 must be a positive int"):
        mj.MambaConfig(d_model=0)
    with pytest.raises(ValueError, match="MambaConfig.scan_impl='fast'"):
        mj.MambaConfig(scan_impl="fast")


@pytest.mark.parametrize("selective", [True, False])
def test_left_padding_mask_leaves_real_tokens_unchanged(selective):
    model = _model(selective=selective)
    ids = jax.random.randint(jax.random.key(4), (1, 12), 0, 97)
    alone, cache_alone = model(ids, cache=model.init_cache(1))
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), ids], axis=1)
    mask = jnp.arange(pad + 12)[None] >= pad
    out, cache = model(padded, cache=model.init_cache(1), mask=mask)
    assert rel_err(out[:, pad:], alone) < 1e-5
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_alone)):
        assert rel_err(a, b) < 1e-5
    # Without the mask the pad tokens do leak into the state.
    unmasked, _ = model(padded, cache=model.init_cache(1))
    assert rel_err(unmasked[:, pad:], alone) > 1e-3
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(b, l\)"):
        model(padded, mask=mask.astype(jnp.int32))


def _buffers(cache):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache) if x.size]


@pytest.mark.parametrize("hybrid", [False, True])
def test_init_cache_buffers_are_independent_and_donatable(hybrid):
    extra = dict(attn_layer_idx=(1,), attn_num_heads=2) if hybrid else {}
    model = _model(n_layer=2, **extra)
    cache = model.init_cache(2, 8 if hybrid else None)
    pointers = _buffers(cache)
    assert len(set(pointers)) == len(pointers)  # every layer, k and v: a buffer of its own
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, ids):
        return nnx.merge(graphdef, state)(ids, cache=cache)

    ids = jax.random.randint(jax.random.key(1), (2, 3), 0, 97)
    logits, new_cache = step(state, cache, ids)  # "donate the same buffer twice" before
    want, _ = model(ids, cache=model.init_cache(2, 8 if hybrid else None))
    assert rel_err(logits, want) < 1e-5
    assert all(x.is_deleted() for x in jax.tree.leaves(cache) if x.size)  # donated indeed


@pytest.mark.parametrize(
    "row, bad",
    [(0, [True, True, False, False, True]), (1, [True, True, True, True, False]), (1, [False, True, False, True, True])],
    ids=["middle", "right", "alternating"],
)
def test_mask_that_is_not_left_padding_raises_naming_the_row(row, bad):
    model = _model()
    ids = jax.random.randint(jax.random.key(4), (2, 5), 0, 97)
    mask = np.ones((2, 5), bool)
    mask[row] = bad
    with pytest.raises(ValueError, match=rf"mask row {row} is not left padding"):
        model(ids, mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match=rf"mask row {row} is not left padding"):
        model(ids, cache=model.init_cache(2), mask=jnp.asarray(mask))


def test_mask_padding_after_cached_tokens_raises():
    model = _model()
    ids = jax.random.randint(jax.random.key(4), (2, 4), 0, 97)
    _, cache = model(ids, cache=model.init_cache(2))
    mask = jnp.asarray([[True] * 4, [False, False, True, True]])
    with pytest.raises(ValueError, match="mask row 1 starts with padding but its cache already holds tokens"):
        model(ids, cache=cache, mask=mask)
    # left padding on an empty cache, and all-real rows after a cache, are fine
    model(ids, cache=model.init_cache(2), mask=mask)
    model(ids, cache=cache, mask=jnp.ones((2, 4), bool))
