"""Attention layers, the gated MLP and the hybrid / Transformer++ layouts of MambaLM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOL, attention_oracle, fan_in_normal, lm_oracle, random_like, random_model, rel_err, teacher_forced_greedy
from flax import nnx

import mamba_jax as mj
from mamba_jax.nn.attention import CausalSelfAttention, apply_rotary
from mamba_jax.train import make_optimizer, train_step

VOCAB = 97  # padded to 104


def hybrid_config(**kw):
    """A Mamba layer, then attention (GQA: 4 query heads, 2 KV heads, RoPE on half of each head); MLPs."""
    base = dict(
        vocab_size=VOCAB, d_model=32, n_layer=2, attn_layer_idx=(1,), d_intermediate=48,
        attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=4, tie_embeddings=False,
    )
    return mj.MambaConfig.tiny(**{**base, **kw})


def transformer_config(**kw):
    base = dict(d_model=32, n_layer=2, vocab_size=VOCAB, attn_num_heads=4, tie_embeddings=False)
    return mj.MambaConfig.transformer_pp(**{**base, **kw})


LAYOUTS = {
    "hybrid": hybrid_config,
    "transformer": transformer_config,
    # with the short convolution over q/k/v of mamba2attn (attn_cfg.d_conv)
    "hybrid-conv": lambda **kw: hybrid_config(attn_d_conv=4, **kw),
}


def filled_model(config, seed=0, dtype=jnp.float32):
    """A MambaLM with random NumPy parameters (conftest.random_model: matrices N(0, 1/fan_in), vectors 1 + N(0, 0.01))."""
    return random_model(config, seed, dtype=dtype)


@pytest.fixture(scope="module")
def models():
    return {name: filled_model(make()) for name, make in LAYOUTS.items()}


# Jitted calls, shared by the tests (few distinct shapes: compilation dominates on CPU).
_forward = nnx.jit(lambda model, ids: model(ids))
_forward_masked = nnx.jit(lambda model, ids, mask: model(ids, mask=mask))
_step = nnx.jit(lambda model, ids, cache: model(ids, cache=cache))
_step_masked = nnx.jit(lambda model, ids, cache, mask: model(ids, cache=cache, mask=mask))
B, L, T = 2, 16, 24  # batch, sequence length, KV cache slots


def _ids(b=B, l=L, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, VOCAB)


def _with_index(cache, index):
    """``cache`` with its KV buffers marked as holding ``index`` slots."""
    return mj.MambaCache(
        layers=tuple(
            c.replace(index=jnp.asarray(index, jnp.int32)) if isinstance(c, mj.AttentionLayerCache) else c
            for c in cache.layers
        )
    )


# ------------------------------------------------------------------ the layer


def test_rope_rotates_half_and_scores_depend_on_position_differences():
    rd, p = 6, 10
    x = jax.random.normal(jax.random.key(0), (1, 1, 1, p))
    pos = jnp.array([[3]], jnp.int32)
    out = np.asarray(apply_rotary(x, pos, rotary_dim=rd, base=100.0))[0, 0, 0]
    xn = np.asarray(x, np.float64)[0, 0, 0]
    ang = 3 * 100.0 ** (-np.arange(0, rd, 2) / rd)
    x1, x2 = xn[:3], xn[3:6]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang), xn[6:]])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)  # rotate-half on the first rd dims only

    q = jax.random.normal(jax.random.key(1), (1, 1, 2, p))
    k = jax.random.normal(jax.random.key(2), (1, 1, 2, p))

    def score(m, n):
        qm = apply_rotary(q, jnp.array([[m]], jnp.int32), rotary_dim=p)
        kn = apply_rotary(k, jnp.array([[n]], jnp.int32), rotary_dim=p)
        return np.asarray(jnp.einsum("blhp,blhp->h", qm, kn))

    for m, n, shift in [(5, 2, 7), (0, 9, 30), (11, 11, 100)]:
        np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-5)
    assert np.abs(score(5, 2) - score(5, 3)).max() > 1e-3  # and they do depend on the difference
    np.testing.assert_array_equal(apply_rotary(q, jnp.zeros((1, 1), jnp.int32), rotary_dim=0), q)


def test_grouped_kv_heads_equal_mha_with_repeated_kv():
    gqa_cfg = hybrid_config(attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=None)
    mha_cfg = gqa_cfg.replace(attn_num_heads_kv=4)
    gqa = nnx.eval_shape(lambda: CausalSelfAttention(gqa_cfg, rngs=nnx.Rngs(0)))
    mha = nnx.eval_shape(lambda: CausalSelfAttention(mha_cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for m in (gqa, mha):
        for layer in (m.in_proj, m.out_proj):
            layer.kernel.set_value(jnp.asarray(rng.standard_normal(layer.kernel.shape).astype(np.float32) / 6))
    h, g, p = 4, 2, gqa_cfg.resolved_attn_head_dim
    w = np.asarray(gqa.in_proj.kernel[...])
    q, k, v = w[:, : h * p], w[:, h * p : (h + g) * p], w[:, (h + g) * p :]
    rep = lambda m: np.repeat(m.reshape(-1, g, p), h // g, axis=1).reshape(-1, h * p)  # KV head i // 2
    mha.in_proj.kernel[...] = jnp.asarray(np.concatenate([q, rep(k), rep(v)], axis=1))
    mha.out_proj.kernel[...] = gqa.out_proj.kernel[...]
    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    call = nnx.jit(lambda m, x: m(x))
    assert rel_err(call(mha, x), call(gqa, x)) < 1e-6


@pytest.mark.parametrize(
    "heads, heads_kv, rotary, bias, d_conv",
    [(4, 2, 4, False, 0), (4, 1, None, True, 0), (2, 2, 0, False, 0), (4, 2, 4, False, 4), (2, 1, 8, True, 2)],
    ids=["gqa-partial-rope", "mqa-full-rope-bias", "mha-no-rope", "gqa-conv4", "mqa-conv2-bias"],
)
def test_attention_layer_matches_the_numpy_oracle(heads, heads_kv, rotary, bias, d_conv):
    cfg = hybrid_config(attn_num_heads=heads, attn_num_heads_kv=heads_kv, attn_rotary_dim=rotary,
                        attn_qkv_bias=bias, attn_out_bias=bias, attn_rope_base=500.0, attn_d_conv=d_conv)
    layer = random_like(nnx.eval_shape(lambda: CausalSelfAttention(cfg, rngs=nnx.Rngs(0))), seed=heads + heads_kv,
                        fill=lambda rng, shape: 0.7 * fan_in_normal(rng, shape))
    x = jax.random.normal(jax.random.key(5), (2, 11, cfg.d_model))
    mask = jnp.arange(11)[None] >= jnp.asarray([0, 4])[:, None]  # row 1 left padded by 4
    oracle = lambda m: attention_oracle(
        x, layer.in_proj.kernel[...], layer.out_proj.kernel[...], num_heads=heads, num_heads_kv=heads_kv,
        rotary_dim=cfg.resolved_attn_rotary_dim, base=500.0, mask=m,
        b_in=layer.in_proj.bias[...] if bias else None, b_out=layer.out_proj.bias[...] if bias else None,
        conv_w=layer.conv1d.kernel[...] if d_conv else None, conv_b=layer.conv1d.bias[...] if d_conv else None,
    )
    call = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    assert rel_err(call(layer, x, None), oracle(None)) < TOL["float32"]
    got, want = np.asarray(call(layer, x, mask)), oracle(np.asarray(mask))
    assert rel_err(got[0], want[0]) < TOL["float32"] and rel_err(got[1, 4:], want[1, 4:]) < TOL["float32"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_model_matches_the_numpy_oracle(models, layout):
    """The whole hybrid / Transformer++ forward against a float64 recomputation from the parameters."""
    ids = _ids(seed=6)
    assert rel_err(_forward(models[layout], ids), lm_oracle(models[layout], ids)) < TOL["float32"]


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_causal_future_tokens_change_no_earlier_logit(models, layout):
    model = models[layout]
    ids = _ids(seed=1)
    changed = ids.at[:, 7].set((ids[:, 7] + 1) % VOCAB)
    a, b = _forward(model, ids), _forward(model, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert float(jnp.abs(a[:, 7:] - b[:, 7:]).min(axis=-1).max()) > 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cache_equals_parallel_forward(models, layout):
    model = models[layout]
    ids = _ids(seed=2)
    full = _forward(model, ids)
    cache = model.init_cache(B, max_length=T)
    assert cache.max_length == T
    outs, pos = [], 0
    for size in (4, 1, 4, 1, 1, 4, 1):  # a prompt, uneven chunks, one-token steps
        logits, cache = _step(model, ids[:, pos : pos + size], cache)
        outs.append(logits)
        pos += size
    assert pos == L
    assert rel_err(jnp.concatenate(outs, axis=1), full) < TOL["float32"]
    kv = next(c for c in cache.layers if isinstance(c, mj.AttentionLayerCache))
    assert int(kv.index) == L and np.asarray(kv.lengths).tolist() == [L, L]
    assert np.asarray(kv.valid).sum() == B * L


def test_cache_equals_parallel_forward_bfloat16():
    model = filled_model(transformer_config(), dtype=jnp.bfloat16)
    ids = _ids(seed=3)
    full = _forward(model, ids)
    assert full.dtype == jnp.bfloat16
    cache = model.init_cache(B, max_length=L)
    assert cache.layers[0].k.dtype == jnp.bfloat16  # keys and values in the compute dtype
    outs = []
    for start in range(0, L, 4):  # (one-token steps are the same code, tested in float32)
        logits, cache = _step(model, ids[:, start : start + 4], cache)
        outs.append(logits)
    assert rel_err(jnp.concatenate(outs, axis=1), full) < TOL["bfloat16"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_left_padding_leaves_real_tokens_unchanged(models, layout):
    model = models[layout]
    ids = _ids(seed=4)
    full = _forward(model, ids)  # causal: full[:, :k] are the logits of the first k tokens alone
    pad = (5, 2)
    padded = jnp.stack([jnp.concatenate([jnp.full((p,), 3, jnp.int32), ids[r, : L - p]]) for r, p in enumerate(pad)])
    mask = jnp.arange(L)[None] >= jnp.asarray(pad)[:, None]
    out = _forward_masked(model, padded, mask)
    for r, p in enumerate(pad):
        assert rel_err(out[r, p:], full[r, : L - p]) < 1e-5, r
    # Without the mask the pad tokens do change the outputs.
    assert rel_err(_forward(model, padded)[0, pad[0] :], full[0, : L - pad[0]]) > 1e-3
    # Through the cache: a padded prefill in chunks, then steps; RoPE positions are not shifted.
    cache = model.init_cache(B, max_length=T)
    for start in range(0, L, 4):
        _, cache = _step_masked(model, padded[:, start : start + 4], cache, mask[:, start : start + 4])
    kv = next(c for c in cache.layers if isinstance(c, mj.AttentionLayerCache))
    assert np.asarray(kv.lengths).tolist() == [L - 5, L - 2] and int(kv.index) == L
    for k in range(2):  # row r continues with ids[r, L - p_r + k], whose logits are in full
        nxt = jnp.stack([ids[r, L - p + k] for r, p in enumerate(pad)])[:, None]
        logits, cache = _step(model, nxt, cache)
        for r, p in enumerate(pad):
            assert rel_err(logits[r, 0], full[r, L - p + k]) < 1e-5, (r, k)


def test_initialisation_rescales_residual_projections():
    from mamba_jax.nn import Block

    cfg = hybrid_config(d_model=64, n_layer=4, attn_layer_idx=(0, 2), attn_num_heads=4, attn_num_heads_kv=None)
    attn, mamba = Block(cfg, layer_idx=0, rngs=nnx.Rngs(0)), Block(cfg, layer_idx=1, rngs=nnx.Rngs(1))
    assert isinstance(attn.mixer, CausalSelfAttention) and isinstance(mamba.mixer, mj.nn.MambaMixer)
    # The reference divides out_proj and fc2 by sqrt(n_residuals_per_layer * n_layer) = sqrt(2 * 4).
    scale = 1 / math.sqrt(2 * 4)
    e, d, f = 64, cfg.d_inner, 48
    for kernel, bound in (
        (attn.mixer.in_proj.kernel, 1 / math.sqrt(e)),
        (attn.mixer.out_proj.kernel, scale / math.sqrt(e)),
        (mamba.mixer.out_proj.kernel, scale / math.sqrt(d)),
        (mamba.mlp.fc1.kernel, 1 / math.sqrt(e)),
        (mamba.mlp.fc2.kernel, scale / math.sqrt(f)),
    ):
        k = np.asarray(kernel[...])
        assert np.abs(k).max() <= bound and k.std() > 0.85 * bound / math.sqrt(3)
    assert attn.mixer.in_proj.bias is None and attn.mixer.out_proj.bias is None and attn.mlp.fc1.bias is None
    np.testing.assert_array_equal(attn.norm2.weight[...], np.ones(e))
    # Every parameter has logical axes.
    for block in (attn, mamba):
        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(block, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
        for path, p in leaves:
            axes = p.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == p[...].ndim, path
    # Pure Mamba blocks keep their names (checkpoints) and have no MLP.
    pure = nnx.eval_shape(lambda: mj.MambaLM(mj.MambaConfig.tiny(), rngs=nnx.Rngs(0)))
    assert sorted(nnx.to_pure_dict(nnx.state(pure, nnx.Param))["layers"][0]) == ["mixer", "norm"]


def _n_params(config):
    abstract = nnx.eval_shape(lambda: mj.MambaLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_transformer_pp_parameter_count():
    cfg = mj.MambaConfig.transformer_pp(d_model=96, n_layer=3, vocab_size=1000, attn_num_heads=6, attn_num_heads_kv=2)
    assert cfg.d_intermediate == 256  # 8/3 * 96 rounded up to a multiple of 8
    assert cfg.attn_layer_idx == (0, 1, 2) and not cfg.attn_qkv_bias and not cfg.attn_out_bias
    e, h, g, p, f = 96, 6, 2, 16, 256
    attention = e * (h + 2 * g) * p + h * p * e
    mlp = e * 2 * f + f * e
    assert _n_params(cfg) == 1000 * e + 3 * (attention + mlp + 2 * e) + e  # tied embedding, 2 norms a block, norm_f
    # The paper's 125M Transformer++ (the defaults) is about as large as the 24-layer Mamba-130m.
    assert abs(_n_params(mj.MambaConfig.transformer_pp()) / _n_params(mj.MambaConfig.mamba_130m()) - 1) < 0.05


def test_hybrid_trains_and_gradients_reach_every_parameter(models):
    model = nnx.clone(models["hybrid"])
    # No weight decay: a parameter moves under Adam exactly when its gradient is nonzero.
    optimizer = make_optimizer(model, learning_rate=3e-3, total_steps=25, warmup_steps=0, weight_decay=0.0)
    ids = _ids(b=4, l=17, seed=7)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": jnp.ones((4, 16), jnp.float32)}
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    metrics = [train_step(model, optimizer, batch)]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    moved = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after))
    assert all(m for _, m in moved), [jax.tree_util.keystr(p) for p, m in moved if not m]
    metrics += [train_step(model, optimizer, batch) for _ in range(24)]
    losses = [float(m["loss"]) for m in metrics]
    assert all(math.isfinite(float(m["grad_norm"])) for m in metrics)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------ generation


def _teacher_forced(model, prompts, steps):
    return teacher_forced_greedy(lambda ids: _forward(model, ids), prompts, steps, L, VOCAB)


PROMPTS = [[11, 42, 7, 90, 3, 5, 61], [5, 20]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_greedy_equals_parallel_forwards(models, layout):
    model = models[layout]
    want = _teacher_forced(model, PROMPTS, 6)
    assert len({t for w in want for t in w}) > 4  # not a model that repeats one token
    # Ragged prompts, left padded inside; each row gets what it gets alone. The hybrid
    # also prefills in chunks (more padding in the KV cache, before the real tokens).
    chunk = 4 if layout != "transformer" else None
    out = mj.generate(model, PROMPTS, 6, temperature=0.0, prefill_chunk=chunk)
    assert np.asarray(out).tolist() == want


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attn_layer_idx=(1, 1)), r"attn_layer_idx=\(1, 1\) has repeated"),
        (dict(attn_layer_idx=(2,)), r"attn_layer_idx=\(2,\) has indices \[2\] outside \[0, n_layer=2\)"),
        (dict(attn_layer_idx="1"), r"attn_layer_idx='1' must be a tuple"),
        (dict(attn_num_heads_kv=3), r"attn_num_heads_kv=3 must divide attn_num_heads=4"),
        (dict(attn_num_heads=5, attn_num_heads_kv=None), r"attn_num_heads=5 must divide d_model=32"),
        (dict(attn_rotary_dim=3), r"attn_rotary_dim=3 must be None or an even int"),
        (dict(attn_rotary_dim=10), r"attn_rotary_dim=10 exceeds the head dimension 8"),
        (dict(attn_num_heads=0), r"attn_num_heads=0 must be a positive int"),
        (dict(attn_head_dim=0), r"attn_head_dim=0 must be None or a positive int"),
        (dict(d_intermediate=-1), r"d_intermediate=-1 must be an int >= 0"),
        (dict(attn_rope_base=1.0), r"attn_rope_base=1.0 must be a number > 1"),
        (dict(attn_qkv_bias=1), r"attn_qkv_bias=1 must be a bool"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        hybrid_config(**kw)


def test_config_list_becomes_tuple_and_head_geometry_only_checked_with_attention():
    cfg = hybrid_config(attn_layer_idx=[1, 0])
    assert cfg.attn_layer_idx == (1, 0) and hash(cfg) == hash(hybrid_config(attn_layer_idx=(1, 0)))
    assert hybrid_config(attn_layer_idx=(), attn_num_heads=5).attn_num_heads == 5  # unused: not checked
    cfg = hybrid_config(attn_head_dim=12, attn_num_heads=3, attn_num_heads_kv=1)  # head_dim given: no divisibility
    assert (cfg.resolved_attn_head_dim, cfg.resolved_attn_rotary_dim, cfg.resolved_attn_num_heads_kv) == (12, 4, 1)


def test_cache_errors(models, tmp_path):
    model = models["transformer"]  # layer 0 is attention: the errors come before any heavy work
    with pytest.raises(ValueError, match="needs max_length"):
        model.init_cache(1)
    with pytest.raises(ValueError, match="max_length=0 must be None or a positive int"):
        model.init_cache(1, 0)
    ids = _ids(seed=8)
    with pytest.raises(ValueError, match=f"{L} new tokens do not fit in the KV cache of max_length=4"):
        model(ids, cache=model.init_cache(B, 4))
    cache = _with_index(model.init_cache(B, T), T - 3)
    with pytest.raises(ValueError, match=f"the KV cache is full: it holds {T - 3} of max_length={T} slots and 4 more"):
        model(ids[:, :4], cache=cache)
    # Under jit the overflow cannot raise: the logits are NaN instead of silently wrong.
    logits, _ = _step(model, ids[:, :1], _with_index(cache, T))
    assert np.all(np.isnan(np.asarray(logits)))
    with pytest.raises(ValueError, match="free slots"):  # generate checks the room left in a given cache
        mj.generate(model, ids[:, :2], 3, temperature=0.0, cache=cache)
    mamba_cache = mj.MambaCache(layers=(mj.MambaLayerCache.zeros(B, 64, 16, 4, jnp.float32),) * 2)
    with pytest.raises(TypeError, match="layers of the kinds of this model"):
        model(ids, cache=mamba_cache)
    # A pure Mamba model ignores max_length (its cache does not grow with the context).
    pure = nnx.eval_shape(lambda: mj.MambaLM(mj.MambaConfig.tiny(d_model=16, n_layer=1), rngs=nnx.Rngs(0)))
    assert pure.init_cache(1, 1000).nbytes() == pure.init_cache(1).nbytes() and pure.init_cache(1).max_length is None
    # The Hugging Face format has no attention or MLP layers.
    with pytest.raises(ValueError, match=r"attn_layer_idx=\(0, 1\) \(attention layers\) cannot be saved"):
        mj.save_pretrained(model, tmp_path / "transformer")
    mlp_only = nnx.eval_shape(lambda: mj.MambaLM(mj.MambaConfig.tiny(d_intermediate=32), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="d_intermediate=32 .MLP blocks. cannot be saved"):
        mj.save_pretrained(mlp_only, tmp_path / "mlp")
    assert not (tmp_path / "transformer").exists()
