"""Mamba-2 models: config and presets, the mixer's initialisation, the recurrent path
against the parallel forward, generation, packed documents, and the mamba_ssm hybrid
directories. Needs neither torch nor transformers (it runs under the newest jax too);
the comparisons with transformers' ``Mamba2ForCausalLM`` are in test_mamba2_parity.py.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOL, random_model, rel_err, teacher_forced_greedy
from flax import nnx

import mamba_jax as mj
from mamba_jax.nn.mamba2 import Mamba2Mixer, mamba2_cache_zeros

def _tiny(**kw) -> mj.MambaConfig:
    base = dict(d_model=32, n_layer=2, vocab_size=96, layer="mamba2", d_state=8, headdim=16, ngroups=2, chunk_size=8)
    return mj.MambaConfig(**{**base, **kw})


def _ids(vocab, b=2, l=21, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, l)), jnp.int32)


def _native(config, seed=0):
    """Every parameter random (NumPy normal scaled by fan-in), not the structured init."""
    return random_model(config, seed)


def _jitted(model):
    """``model(ids, cache=None, mask=None)`` jitted (one compile per shape, not per op: a faster test)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids, cache, mask: nnx.merge(graphdef, state)(ids, cache=cache, mask=mask))
    return lambda ids, cache=None, mask=None: run(state, ids, cache, mask)


# --------------------------------------------------------------------------- config and presets


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(layer="mamba3"), r"MambaConfig.layer='mamba3'"),
        (dict(headdim=24), r"MambaConfig.headdim=24 must divide d_ssm=64"),
        (dict(ngroups=3), r"MambaConfig.ngroups=3 must divide the number of heads"),
        (dict(d_ssm=128), r"MambaConfig.d_ssm=128 must be <= d_inner"),
        (dict(d_ssm=40), r"MambaConfig.headdim=16 must divide d_ssm=40"),
        (dict(dt_limit=(0.5, 0.1)), r"MambaConfig.dt_limit=\(0.5, 0.1\)"),
        (dict(dt_limit=(0.1,)), r"MambaConfig.dt_limit=\(0.1,\) must be a pair"),
        (dict(A_init_range=(0.0, 16.0)), r"MambaConfig.A_init_range"),
        (dict(chunk_size=0), r"MambaConfig.chunk_size=0"),
        (dict(ssd_impl="fast"), r"MambaConfig.ssd_impl='fast'"),
        (dict(D_has_hdim=1), r"MambaConfig.D_has_hdim=1 must be a bool"),
        (dict(selective=False), r"selective=False.*'mamba1' only"),
    ],
)
def test_config_validation_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**change)


def test_config_lists_become_tuples_and_hash():
    cfg = _tiny(dt_limit=[0.001, 1], A_init_range=[1, 4])
    assert cfg.dt_limit == (0.001, 1.0) and cfg.A_init_range == (1.0, 4.0)
    hash(cfg)
    assert cfg.nheads == 4 and cfg.resolved_d_ssm == 64 and cfg.is_mamba2


# Published state-spaces/mamba2-* config.json: d_model, n_layer (Mamba2 defaults otherwise:
# d_state 128, headdim 64, ngroups 1, expand 2, d_conv 4, chunk 256; vocab 50277 padded to 16;
# tied embeddings). Parameter counts of MambaLM with these presets (embedding 50288 x d_model).
PRESETS = {
    "mamba2_130m": (768, 24, 128_989_632),
    "mamba2_370m": (1024, 48, 368_346_624),
    "mamba2_780m": (1536, 48, 780_161_280),
    "mamba2_1_3b": (2048, 48, 1_343_757_312),
    "mamba2_2_7b": (2560, 64, 2_702_599_680),
}


def _param_count(config) -> int:
    model = nnx.eval_shape(lambda: mj.MambaLM(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_the_published_configs_and_counts(name):
    e, n_layer, count = PRESETS[name]
    cfg = getattr(mj.MambaConfig, name)()
    assert (cfg.d_model, cfg.n_layer, cfg.layer, cfg.d_state, cfg.headdim, cfg.ngroups, cfg.expand) == (
        e, n_layer, "mamba2", 128, 64, 1, 2
    )
    assert (cfg.chunk_size, cfg.vocab_size, cfg.padded_vocab_size, cfg.tie_embeddings) == (256, 50277, 50288, True)
    # Abstract models of 1 and 2 layers give the shared part and the per-layer part.
    one, two = _param_count(cfg.replace(n_layer=1)), _param_count(cfg.replace(n_layer=2))
    assert one + (n_layer - 1) * (two - one) == count
    d, h, n = 2 * e, 2 * e // 64, 128
    per_layer = e * (2 * d + 2 * n + h) + (d + 2 * n) * 5 + 3 * h + d + d * e + e
    assert two - one == per_layer
    assert one - per_layer == 50288 * e + e  # embedding + norm_f


def test_mamba2_780m_shapes_match_the_published_tensors():
    """The tensor shapes of state-spaces/mamba2-780m: in_proj (6448, 1536), conv1d (3328, 1, 4)."""
    cfg = mj.MambaConfig.mamba2_780m().replace(n_layer=1)
    mixer = nnx.eval_shape(lambda: mj.MambaLM(cfg, rngs=nnx.Rngs(0))).layers[0].mixer
    assert mixer.in_proj.kernel.shape == (1536, 6448) and mixer.conv1d.kernel.shape == (4, 3328)
    assert mixer.A_log.shape == mixer.dt_bias.shape == mixer.D.shape == (48,)


def test_mamba2attn_preset_matches_the_published_config():
    """state-spaces/mamba2attn-2.7b config.json: the mamba2_2_7b geometry plus attn_layer_idx
    [9, 18, 27, 36, 45, 56] and attn_cfg {causal, d_conv 4, head_dim 128, num_heads 30,
    out_proj_bias false, qkv_proj_bias false, rotary_emb_dim 64}."""
    cfg = mj.MambaConfig.mamba2attn_2_7b()
    assert cfg.replace(attn_layer_idx=(), attn_d_conv=0) == mj.MambaConfig.mamba2_2_7b().replace(
        attn_num_heads=30, attn_head_dim=128, attn_rotary_dim=64
    )
    assert cfg.attn_layer_idx == (9, 18, 27, 36, 45, 56) and cfg.attn_d_conv == 4
    small = cfg.replace(n_layer=10, attn_layer_idx=(9,))
    attn = nnx.eval_shape(lambda: mj.MambaLM(small, rngs=nnx.Rngs(0))).layers[9].mixer
    qkv = 128 * (30 + 2 * 30)  # MHA: head_dim * (num_heads + 2 * num_heads_kv), num_heads_kv = num_heads
    assert attn.in_proj.kernel.shape == (2560, qkv) and attn.in_proj.bias is None
    assert attn.conv1d.kernel.shape == (4, qkv) and attn.conv1d.bias.shape == (qkv,)
    assert attn.out_proj.kernel.shape == (30 * 128, 2560) and attn.out_proj.bias is None


# --------------------------------------------------------------------------- initialisation


def test_mixer_initialisation_statistics():
    cfg = _tiny(d_model=256, n_layer=4, headdim=8, ngroups=1, dt_min=0.002, dt_max=0.05, A_init_range=(2.0, 8.0))
    mixer = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    h = cfg.nheads  # 64
    A = np.exp(np.asarray(mixer.A_log[...]))
    assert A.shape == (h,) and A.min() >= 2.0 and A.max() <= 8.0 and A.std() > 1.0  # U(2, 8): std 1.73
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))  # the inverse softplus is undone exactly
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    log_dt = np.log(dt)  # log-uniform: log dt uniform on [log 0.002, log 0.05]
    assert abs(log_dt.mean() - (math.log(0.002) + math.log(0.05)) / 2) < 0.3
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), np.ones(h))
    np.testing.assert_array_equal(np.asarray(mixer.norm.weight[...]), np.ones(cfg.d_inner))
    conv = np.asarray(mixer.conv1d.kernel[...])
    assert conv.shape == (4, cfg.d_inner + 2 * cfg.d_state) and np.abs(conv).max() <= 0.5  # U(+-1/sqrt(k))
    assert abs(conv.std() - 0.5 / math.sqrt(3)) < 0.02
    w_in = np.asarray(mixer.in_proj.kernel[...])
    assert w_in.shape == (256, 2 * 512 + 2 * cfg.d_state + h)
    assert abs(w_in.std() - 1 / math.sqrt(3 * 256)) < 0.002
    w_out = np.asarray(mixer.out_proj.kernel[...])  # torch default / sqrt(n_layer)
    assert np.abs(w_out).max() <= 1 / math.sqrt(512) / 2 + 1e-7
    assert abs(w_out.std() - 1 / math.sqrt(3 * 512) / 2) < 0.001
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None


def test_a_init_is_uniform_not_the_hf_arange():
    a = np.exp(np.asarray(Mamba2Mixer(_tiny(d_model=512, headdim=8, ngroups=1), rngs=nnx.Rngs(1)).A_log[...]))
    assert 1.0 <= a.min() and a.max() <= 16.0 and abs(a.mean() - 8.5) < 1.0


# --------------------------------------------------------------------------- recurrent path, padding, generation

RECURRENT_CASES = {
    "g2": dict(),
    "g1-dssm-mlp-branch": dict(ngroups=1, d_ssm=32),
    "Dhdim-dtlimit-normfirst": dict(D_has_hdim=True, dt_limit=(0.01, 0.5), norm_before_gate=True, conv_bias=False),
    "hybrid-attn-mlp": dict(n_layer=3, attn_layer_idx=(1,), attn_num_heads=4, d_intermediate=48),
    "reference-impl": dict(ssd_impl="reference", bias=True),
}


@pytest.mark.parametrize("case", sorted(RECURRENT_CASES))
def test_prompt_chunk_and_tokens_equal_the_parallel_forward(case):
    cfg = _tiny(**RECURRENT_CASES[case])
    model = _native(cfg, seed=1)
    run = _jitted(model)
    ids = _ids(cfg.vocab_size, l=16)
    full = run(ids)
    cache = model.init_cache(2, max_length=32)
    assert cache.layers[0].ssm_state.shape == (2, cfg.nheads, 16, 8)
    pieces = []
    for lo, hi in [(0, 9), (9, 13)] + [(t, t + 1) for t in range(13, 16)]:  # prompt, a chunk (across a chunk edge), tokens
        logits, cache = run(ids[:, lo:hi], cache)
        pieces.append(logits)
    err = rel_err(jnp.concatenate(pieces, axis=1), full)
    assert err < TOL["float32"], err


def test_one_token_step_is_ssd_step_under_jit():
    cfg = _tiny()
    model = _native(cfg, seed=2)
    ids = _ids(cfg.vocab_size, l=5)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, tok):
        return nnx.merge(graphdef, state)(tok, cache=cache)

    cache = model.init_cache(2)
    outs = []
    for t in range(5):
        logits, cache = step(state, cache, ids[:, t : t + 1])
        outs.append(logits)
    assert rel_err(jnp.concatenate(outs, axis=1), model(ids)) < TOL["float32"]
    assert cache.layers[0].ssm_state.dtype == jnp.float32
    assert cache.layers[0].conv_state.shape == (2, 3, 64 + 2 * 2 * 8)


def test_left_padding_gives_each_row_its_own_logits():
    cfg = _tiny()
    model = _native(cfg, seed=3)
    run = _jitted(model)
    ids = _ids(cfg.vocab_size, b=2, l=11)
    mask = jnp.asarray([[True] * 11, [False] * 4 + [True] * 7])
    logits, _ = run(ids, model.init_cache(2), mask)
    alone = run(ids[:, 4:])
    assert rel_err(logits[1, 4:], alone[1]) < TOL["float32"]
    assert rel_err(logits[0], run(ids)[0]) < TOL["float32"]


@pytest.mark.parametrize("hybrid", [False, True])
def test_generate_matches_step_by_step_argmax(hybrid):
    cfg = _tiny(**(dict(n_layer=3, attn_layer_idx=(2,), attn_num_heads=2) if hybrid else {}))
    model = _native(cfg, seed=4)
    prompts = [[5, 7, 11, 13, 2, 3], [17, 19, 23]]  # ragged: left padded by generate
    out = mj.generate(model, prompts, max_new_tokens=6, temperature=0.0)
    want = teacher_forced_greedy(model, prompts, steps=6, length=12, vocab=cfg.vocab_size)
    assert np.asarray(out).tolist() == want


def test_gradients_are_finite():
    cfg = _tiny()
    model = _native(cfg, seed=5)
    ids = _ids(cfg.vocab_size, l=12)

    def loss(model):
        logits = model(ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads.layers[0].mixer.A_log[...]).sum()) > 0


@pytest.mark.parametrize(
    "change, match",
    [(dict(D_has_hdim=True), "D_has_hdim=True"), (dict(d_ssm=32), "d_ssm=32"), (dict(norm_before_gate=True), "norm_before_gate")],
)
def test_save_pretrained_refuses_what_hf_cannot_hold(change, match, tmp_path):
    model = _native(_tiny(**change))
    with pytest.raises(ValueError, match=match):
        mj.save_pretrained(model, tmp_path)


def _write_mamba_ssm_hybrid(model, path, attn_cfg, ssm_cfg):
    """``model`` in the layout of mamba_ssm's MambaLMHeadModel.save_pretrained (names from the name table)."""
    from mamba_jax.interop import safetensors_io
    from mamba_jax.interop.names import path_to_key

    cfg = model.config
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, fout = path_to_key(p, embed_key="backbone.embedding.weight")
        tensors[key] = np.ascontiguousarray(fout(np.asarray(var.get_value())))
    path.mkdir()
    safetensors_io.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "d_model": cfg.d_model, "d_intermediate": cfg.d_intermediate, "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": list(cfg.attn_layer_idx),
        "attn_cfg": attn_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "tie_embeddings": cfg.tie_embeddings,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("layer, d_conv", [("mamba1", 0), ("mamba2", 0), ("mamba2", 4)])
def test_mamba_ssm_hybrid_directory(layer, d_conv, tmp_path):
    """attn_layer_idx + attn_cfg (the reference MHA arguments; d_conv 4 as mamba2attn-2.7b)
    + d_intermediate (a multiple of 128)."""
    attn_cfg = {"causal": True, "num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4,
                "qkv_proj_bias": True, "out_proj_bias": False, "d_conv": d_conv}
    kw = dict(attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2, attn_head_dim=8, attn_rotary_dim=4,
              attn_qkv_bias=True, attn_out_bias=False, attn_d_conv=d_conv, d_intermediate=128, n_layer=3)
    if layer == "mamba2":
        cfg, ssm_cfg = _tiny(**kw), {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}
    else:
        cfg, ssm_cfg = mj.MambaConfig(d_model=32, vocab_size=96, d_state=8, **kw), {"layer": "Mamba1", "d_state": 8}
    model = _native(cfg, seed=8)
    path = _write_mamba_ssm_hybrid(model, tmp_path / "ssm", attn_cfg, ssm_cfg)
    config = json.loads((path / "config.json").read_text())
    config["d_intermediate"] = 100  # the reference GatedMLP rounds it up to 128
    (path / "config.json").write_text(json.dumps(config))
    loaded = mj.from_pretrained(path)
    assert loaded.config == cfg
    ids = _ids(96, l=11)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    if d_conv:  # the attention convolution's weights are mixer.conv1d.{weight,bias} of the layer
        from mamba_jax.interop import safetensors_io

        assert "backbone.layers.1.mixer.conv1d.bias" in safetensors_io.load_file(path / "model.safetensors")
    config["attn_cfg"] = {"num_heads": 4, "causal": True, "window": 3}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown attn_cfg key 'window'"):
        mj.from_pretrained(path)


def test_mixer_packed_documents_equal_each_alone():
    """seq_idx at the mixer: no conv history and no SSD state crosses a boundary, also from a cache."""
    cfg = _tiny(ssd_impl="chunked")
    graphdef, state = nnx.split(Mamba2Mixer(cfg, rngs=nnx.Rngs(9)))
    mixer = jax.jit(lambda x, cache=None, seq_idx=None: nnx.merge(graphdef, state)(x, cache, seq_idx=seq_idx))
    lengths = [5, 1, 9, 3]  # one-token and chunk-crossing documents
    x = jax.random.normal(jax.random.key(0), (1, sum(lengths), cfg.d_model))
    seq_idx = jnp.asarray(np.repeat(np.arange(len(lengths)) * 3, lengths)[None], jnp.int32)  # ids 0, 3, 6, 9
    packed = mixer(x, seq_idx=seq_idx)
    starts = np.cumsum([0] + lengths)
    alone = jnp.concatenate([mixer(x[:, a:b]) for a, b in zip(starts[:-1], starts[1:])], axis=1)
    assert rel_err(packed, alone) < TOL["float32"]
    # From a cache: a first call ending inside document 3, then the rest (its first document continues).
    cache = mamba2_cache_zeros(cfg, 1, jnp.float32)
    y1, cache = mixer(x[:, :10], cache, seq_idx=seq_idx[:, :10])
    y2, _ = mixer(x[:, 10:], cache, seq_idx=seq_idx[:, 10:])
    assert rel_err(jnp.concatenate([y1, y2], axis=1), alone) < TOL["float32"]


def test_model_packed_documents_equal_each_alone():
    cfg = _tiny(n_layer=2)
    model = _native(cfg, seed=10)
    run = jax.jit(lambda ids, seq_idx: model(ids, seq_idx=seq_idx))
    lengths = [[6, 10], [16]]
    ids = _ids(cfg.vocab_size, b=2, l=16)
    seq_idx = jnp.asarray([np.repeat(np.arange(len(r)), r) for r in lengths], jnp.int32)
    packed = run(ids, seq_idx)
    alone = model(ids)
    assert rel_err(packed[1], alone[1]) < TOL["float32"]
    assert rel_err(packed[0, :6], alone[0, :6]) < TOL["float32"]
    assert rel_err(packed[0, 6:], model(ids[:1, 6:])[0]) < TOL["float32"]
    with pytest.raises(ValueError, match="seq_idx row 0 decreases"):
        model(ids, seq_idx=seq_idx[:, ::-1])  # (Mamba-1 and hybrid layouts: tests/test_packed.py)
