"""Checkpoint import/export vs the reference implementation (transformers' MambaForCausalLM) on CPU.

Random transformers models are saved in the Hugging Face layout (safetensors,
sharded safetensors, pytorch_model.bin) and in the mamba_ssm layout (renamed
state dict + its own config.json), loaded with ``mj.from_pretrained`` and
compared logit by logit; ``mj.save_pretrained`` output is loaded back by
transformers. torch and transformers are test dependencies: this module fails
(it does not skip) when they are missing.
"""

import json
import math
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import TOL, random_model, rel_err

import mamba_jax as mj
from mamba_jax.interop import safetensors_io

PARITY_TOL = 1e-4  # float32 logits, relative error (issue 5)
transformers.logging.set_verbosity_error()


def _hf_model(seed=0, **kw) -> transformers.MambaForCausalLM:
    """A random transformers Mamba with every parameter perturbed away from its structured init."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p) if "A_log" not in name else 0.1 * torch.rand_like(p))
    return model


def _native_model(config, seed=0, param_dtype=jnp.float32) -> "mj.MambaLM":
    """A MambaLM with random N(0, 0.3^2) parameters drawn by NumPy (conftest.random_model)."""
    return random_model(config, seed, param_dtype=param_dtype, fill=lambda rng, shape: 0.3 * rng.standard_normal(shape))


def _ids(vocab, b=2, l=19, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, l))


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _our_logits(model, ids):
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def _write_mamba_ssm(hf: transformers.MambaForCausalLM, path, *, vocab_size, pad_multiple, extra_config=None):
    """The layout of mamba_ssm's MambaLMHeadModel.save_pretrained: its config.json + pytorch_model.bin."""
    c = hf.config
    path.mkdir(parents=True)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, path / "pytorch_model.bin")
    config = {
        "d_model": c.hidden_size,
        "d_intermediate": 0,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab_size,
        "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand, "dt_rank": c.time_step_rank,
                    "conv_bias": c.use_conv_bias, "bias": c.use_bias, "layer": "Mamba1"},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple,
        "tie_embeddings": c.tie_word_embeddings,
        **(extra_config or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


HF_CASES = {
    "untied-noconvbias-v101": dict(tie_word_embeddings=False, use_conv_bias=False),
    "tied-bias-k3-rank5": dict(tie_word_embeddings=True, use_bias=True, conv_kernel=3, time_step_rank=5, state_size=4),
    "tied-wide-expand3": dict(hidden_size=48, num_hidden_layers=3, expand=3, vocab_size=64, layer_norm_epsilon=1e-6),
}
MEASURED: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("print_measured")


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_safetensors_parity(case, tmp_path):
    hf = _hf_model(**HF_CASES[case])
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = mj.from_pretrained(tmp_path)
    v = hf.config.vocab_size
    assert model.config.padded_vocab_size == v and model.config.tie_embeddings == hf.config.tie_word_embeddings
    ids = _ids(v)
    err = rel_err(_our_logits(model, ids), _ref_logits(hf, ids))
    MEASURED[f"hf-safetensors-{case}"] = err
    print(f"hf-safetensors {case}: rel err {err:.2e}")
    assert err < PARITY_TOL


def test_hf_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = _hf_model(seed=1, tie_word_embeddings=False)
    ids = _ids(101)
    ref = _ref_logits(hf, ids)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    err = rel_err(_our_logits(mj.from_pretrained(tmp_path / "sharded"), ids), ref)
    MEASURED["hf-sharded-safetensors"] = err
    assert err < PARITY_TOL
    # pytorch_model.bin (what older transformers wrote with safe_serialization=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    err = rel_err(_our_logits(mj.from_pretrained(bin_dir), ids), ref)
    MEASURED["hf-pytorch_model.bin"] = err
    print(f"sharded / bin: {MEASURED['hf-sharded-safetensors']:.2e} {err:.2e}")
    assert err < PARITY_TOL


def test_tied_pytorch_bin_carries_lm_head(tmp_path):
    """torch state dicts of tied models also hold lm_head.weight; it must equal the embedding."""
    hf = _hf_model(seed=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "st")
    sd = hf.state_dict()
    assert "lm_head.weight" in sd
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    ids = _ids(101)
    assert rel_err(_our_logits(mj.from_pretrained(tmp_path / "bin"), ids), _ref_logits(hf, ids)) < PARITY_TOL
    sd = {k: v.clone() for k, v in sd.items()}
    sd["lm_head.weight"] += 1.0
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        mj.from_pretrained(tmp_path / "bin")


@pytest.mark.parametrize("tied", [True, False])
def test_mamba_ssm_layout_parity(tied, tmp_path):
    """vocab_size 100 padded to a multiple of 8: the state dict has 104 rows, as mamba_ssm writes."""
    hf = _hf_model(seed=3, vocab_size=104, tie_word_embeddings=tied, use_conv_bias=not tied)
    path = _write_mamba_ssm(hf, tmp_path / "ssm", vocab_size=100, pad_multiple=8)
    model = mj.from_pretrained(path)
    assert model.config.vocab_size == 100 and model.config.padded_vocab_size == 104
    ids = _ids(100)
    err = rel_err(_our_logits(model, ids), _ref_logits(hf, ids))
    MEASURED[f"mamba_ssm-{'tied' if tied else 'untied'}"] = err
    print(f"mamba_ssm tied={tied}: rel err {err:.2e}")
    assert err < PARITY_TOL


def test_vocab_padding_both_ways(tmp_path):
    hf = _hf_model(seed=4, vocab_size=101, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    ids = _ids(101)
    ref = _ref_logits(hf, ids)
    # Pad up to a multiple of 16: zero rows/columns appended, real logits unchanged.
    padded = mj.from_pretrained(tmp_path / "hf", pad_vocab_size_multiple=16)
    assert padded.config.vocab_size == 101 and padded.config.padded_vocab_size == 112
    out = _our_logits(padded, ids)
    assert rel_err(out[..., :101], ref) < PARITY_TOL
    np.testing.assert_array_equal(out[..., 101:], 0.0)
    # Saved padded (default): transformers sees 112 rows; unpadded: 101 rows again.
    mj.save_pretrained(padded, tmp_path / "out_padded")
    assert json.loads((tmp_path / "out_padded" / "config.json").read_text())["vocab_size"] == 112
    mj.save_pretrained(padded, tmp_path / "out_unpadded", unpad_vocab=True)
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "out_unpadded").eval()
    assert back.config.vocab_size == 101
    assert rel_err(_ref_logits(back, ids), ref) < PARITY_TOL
    # An HF checkpoint whose rows are padded beyond the tokenizer: vocab_size= records the real size.
    reloaded = mj.from_pretrained(tmp_path / "out_padded", vocab_size=101)
    assert reloaded.config.vocab_size == 101 and reloaded.config.padded_vocab_size == 112
    with pytest.raises(ValueError, match="exceeds"):
        mj.from_pretrained(tmp_path / "hf", vocab_size=200)
    with pytest.raises(ValueError, match="rows would be dropped"):
        mj.from_pretrained(tmp_path / "out_padded", vocab_size=90, pad_vocab_size_multiple=2)


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_round_trip_through_transformers(tied, tmp_path):
    hf = _hf_model(seed=5, tie_word_embeddings=tied, use_bias=not tied)
    hf.save_pretrained(tmp_path / "src")
    model = mj.from_pretrained(tmp_path / "src")
    mj.save_pretrained(model, tmp_path / "dst")
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    for k, v in hf.state_dict().items():  # every tensor comes back bit for bit
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    ids = _ids(101)
    ours = _our_logits(model, ids)
    err = rel_err(_ref_logits(back, ids), ours)
    MEASURED[f"round-trip-{'tied' if tied else 'untied'}"] = err
    assert err < PARITY_TOL
    # and our own loader reads what we wrote, identically
    np.testing.assert_array_equal(_our_logits(mj.from_pretrained(tmp_path / "dst"), ids), ours)


def test_save_pretrained_of_a_native_model(tmp_path):
    """A model made here (random bf16 params) goes to transformers with the same logits."""
    cfg = mj.MambaConfig.tiny(d_model=32, n_layer=2, vocab_size=50, tie_embeddings=False)
    model = _native_model(cfg, seed=7, param_dtype=jnp.bfloat16)
    mj.save_pretrained(model, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:  # the reference reader agrees
        assert f.get_tensor("backbone.norm_f.weight").dtype == torch.bfloat16
        assert f.get_tensor("backbone.embeddings.weight").shape == (56, 32)
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(50)
    assert rel_err(_ref_logits(back, ids), _our_logits(model, ids)) < PARITY_TOL


def test_bfloat16_safetensors_read_without_torch(tmp_path):
    hf = _hf_model(seed=6).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    tensors = safetensors_io.load_file(tmp_path / "model.safetensors")
    w = tensors["backbone.layers.0.mixer.in_proj.weight"]
    assert w.dtype == ml_dtypes.bfloat16
    ref = hf.state_dict()["backbone.layers.0.mixer.in_proj.weight"].float().numpy()
    np.testing.assert_array_equal(w.astype(np.float32), ref)
    model = mj.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(model.layers[0].mixer.in_proj.kernel[...]).astype(np.float32), ref.T
    )


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
    hf = _hf_model(seed=7)
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"mamba-jax\[torch\]"):
        mj.from_pretrained(tmp_path / "bin")
    mj.from_pretrained(tmp_path / "st")  # safetensors need no torch


@pytest.fixture
def hf_dir(tmp_path):
    _hf_model(seed=8, tie_word_embeddings=False).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_tensors(path, fn):
    tensors = {k: np.array(v) for k, v in safetensors_io.load_file(path / "model.safetensors").items()}
    fn(tensors)
    safetensors_io.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_error_unknown_key(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.__setitem__("backbone.layers.0.mixer.foo", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"unknown checkpoint key 'backbone.layers.0.mixer.foo'"):
        mj.from_pretrained(hf_dir)


def test_error_missing_key(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.pop("backbone.layers.1.mixer.x_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks .*backbone.layers.1.mixer.x_proj.weight"):
        mj.from_pretrained(hf_dir)


def test_error_extra_layer(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"does not use: .*backbone.layers.1."):
        mj.from_pretrained(hf_dir)


def test_error_shape_mismatch(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(state_size=4))
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer.A_log.*shape \(64, 8\).*\(64, 4\)"):
        mj.from_pretrained(hf_dir)


def test_error_vocab_rows_disagree(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(vocab_size=100, pad_vocab_size_multiple=8))
    with pytest.raises(ValueError, match=r"vocab_size=100 but the embedding has 101 rows"):
        mj.from_pretrained(hf_dir)


def test_hf_config_with_unpadded_vocab_size(tmp_path):
    """config.json vocab_size 101 (the tokenizer's) with 104 rows, as pad_vocab_size_multiple=8 gives."""
    hf = _hf_model(seed=10, vocab_size=104, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda c: c.update(vocab_size=101, pad_vocab_size_multiple=8))
    model = mj.from_pretrained(tmp_path)
    assert model.config.vocab_size == 101 and model.config.padded_vocab_size == 104
    ids = _ids(101)
    err = rel_err(_our_logits(model, ids), _ref_logits(hf, ids))
    MEASURED["hf-unpadded-vocab_size"] = err
    assert err < PARITY_TOL


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mamba3"}, r"model_type='mamba3' is not supported"),
        ({"model_type": "falcon_mamba"}, r"model_type='falcon_mamba'"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({"intermediate_size": 10}, r"intermediate_size=10"),
        ({"rms_norm": False}, r"rms_norm=False"),
    ],
)
def test_error_unsupported_hf_config(hf_dir, change, match):
    _edit_config(hf_dir, lambda c: c.update(change))
    with pytest.raises(ValueError, match=match):
        mj.from_pretrained(hf_dir)


def test_unknown_hf_config_key_warns(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(my_custom_flag=3))
    with pytest.warns(UserWarning, match="my_custom_flag"):
        mj.from_pretrained(hf_dir)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rms_norm": False}, r"rms_norm=False.*LayerNorm"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, r"ssm_cfg.layer='Mamba3'"),
        # a hybrid config whose checkpoint holds no MLP / attention weights (the hybrid import is in test_mamba2.py)
        ({"d_intermediate": 128}, r"the checkpoint lacks tensors the model needs"),
        ({"attn_layer_idx": [1], "attn_cfg": {"causal": True, "num_heads": 4, "mlp_dim": 64}}, r"attn_cfg.mlp_dim=64"),
        ({"norm_eps": 1e-6}, r"unknown mamba_ssm config key 'norm_eps'"),
        ({"vocab_size": 90}, r"vocab_size=90 padded to a multiple of 8 is 96, but the embedding has 104 rows"),
    ],
)
def test_error_unsupported_mamba_ssm_config(tmp_path, change, match):
    hf = _hf_model(seed=9, vocab_size=104)
    path = _write_mamba_ssm(hf, tmp_path / "ssm", vocab_size=100, pad_multiple=8)
    if "ssm_cfg" in change:
        _edit_config(path, lambda c: c["ssm_cfg"].update(change["ssm_cfg"]))
    else:
        _edit_config(path, lambda c: c.update(change))
    with pytest.raises(ValueError, match=match):
        mj.from_pretrained(path)


def test_error_no_weights_and_bad_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        mj.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 8}))
    with pytest.raises(ValueError, match="neither 'model_type'"):
        mj.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        mj.from_pretrained(tmp_path / "nope")


def test_truncated_safetensors_is_reported(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        mj.from_pretrained(hf_dir)


def test_lti_model_cannot_be_exported(tmp_path):
    model = _native_model(mj.MambaConfig.tiny(d_model=16, n_layer=1, selective=False))
    with pytest.raises(ValueError, match="selective=False"):
        mj.save_pretrained(model, tmp_path)




# --------------------------------------------------------------------------- experiments/perplexity.py


def _perplexity_main():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "perplexity.py"
    spec = importlib.util.spec_from_file_location("perplexity_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TEXT = (
    "Mamba is a selective state space model. Its recurrence keeps a fixed-size state,\n"
    "so a long document can be scored chunk by chunk with the state carried along.\n"
    "Ünïcödé bytes count too: naïve café, 東京, ελληνικά.\n"
) * 4


def _direct_nll(model, ids, streams):
    """Sum of next-token NLL over `streams` contiguous segments, each in one full forward."""
    seg = len(ids) // streams
    tokens = jnp.asarray(np.asarray(ids[: seg * streams], np.int32).reshape(streams, seg))
    logits = model(tokens)[..., : model.config.vocab_size].astype(jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    tgt = np.asarray(tokens)[:, 1:]
    return -np.take_along_axis(logp[:, :-1], tgt[..., None], axis=-1).sum(), streams * (seg - 1)


def test_perplexity_script_bytes(tmp_path):
    model = _native_model(mj.MambaConfig.tiny(d_model=32, n_layer=2, vocab_size=256), seed=3)
    mj.save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    res = _perplexity_main()([str(tmp_path / "ckpt"), str(tmp_path / "text.txt"), "--streams", "2", "--chunk-len", "37"])
    assert res["tokenizer"] == "bytes"
    data = TEXT.encode("utf-8")
    nll, n = _direct_nll(model, list(data), 2)
    assert res["tokens"] == n == res["bytes"]
    assert abs(res["nll_sum"] - nll) / nll < 1e-5
    assert abs(res["perplexity"] - math.exp(nll / n)) / math.exp(nll / n) < 1e-5
    assert abs(res["bits_per_byte"] - nll / math.log(2) / n) < 1e-5
    # --max-bytes reads a prefix only
    part = _perplexity_main()([str(tmp_path / "ckpt"), str(tmp_path / "text.txt"), "--streams", "1", "--max-bytes", "100"])
    assert part["tokens"] == 99


def test_perplexity_script_with_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab_size()
    model = _native_model(mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=vocab), seed=4)
    mj.save_pretrained(model, tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    res = _perplexity_main()([str(tmp_path / "ckpt"), str(tmp_path / "text.txt"), "--streams", "3", "--chunk-len", "16"])
    assert res["tokenizer"] == "auto"
    ids = tok.encode(TEXT).ids
    nll, n = _direct_nll(mj.from_pretrained(tmp_path / "ckpt"), ids, 3)
    assert res["tokens"] == n < len(TEXT.encode("utf-8"))
    assert abs(res["nll_sum"] - nll) / nll < 1e-5
    # 3 streams of 181 tokens: the bytes after each stream's first token, counted once
    enc = tok.encode(TEXT)
    ends = [len(TEXT[: e].encode("utf-8")) for _, e in enc.offsets]
    seg = len(ids) // 3
    assert res["bytes"] == sum(ends[s * seg + seg - 1] - ends[s * seg] for s in range(3))
    assert 0.9 * len(TEXT.encode("utf-8")) < res["bytes"] < len(TEXT.encode("utf-8"))
    assert abs(res["bits_per_byte"] - nll / math.log(2) / res["bytes"]) < 1e-6


# --------------------------------------------------------------------------- round trips keep what they were given


def test_save_into_a_sharded_checkpoint_replaces_it_and_keeps_token_ids(tmp_path):
    """The fine-tune recipe: load a sharded checkpoint, change the weights, save over it."""
    hf = _hf_model(seed=11, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                   initializer_range=0.05)
    src = tmp_path / "ckpt"
    hf.save_pretrained(src, max_shard_size="20KB")
    shards = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    (src / "tokenizer.json").write_text("{}")  # not a weight file: it stays
    model = mj.from_pretrained(src)
    from flax import nnx

    # "fine-tuning": weights that differ from the files' everywhere
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x * 1.5, nnx.to_pure_dict(state)))
    tuned = nnx.merge(graphdef, state)
    with pytest.warns(UserWarning, match=r"removed the weight files .*model-00001-of-.*model.safetensors.index.json"):
        mj.save_pretrained(tuned, src)
    # only weight files went: transformers' generation_config.json and the tokenizer stay
    assert {p.name for p in src.iterdir()} == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    config = json.loads((src / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["initializer_range"] == 0.05  # a field read and not used comes back out too
    ids = _ids(101)
    want = _our_logits(tuned, ids)
    assert not np.allclose(want, _ref_logits(hf, ids), rtol=1e-2)  # stale weights would be noticed
    np.testing.assert_array_equal(_our_logits(mj.from_pretrained(src), ids), want)
    back = transformers.MambaForCausalLM.from_pretrained(src).eval()
    assert (back.config.bos_token_id, back.config.eos_token_id, back.config.pad_token_id) == (1, 2, 3)
    assert rel_err(_ref_logits(back, ids), want) < PARITY_TOL
    # and once more: the ids survive a second round trip through our loader
    assert mj.from_pretrained(src).hf_config_extras.get("eos_token_id") == 2


def test_save_into_an_empty_directory_says_nothing_and_a_native_model_gets_default_ids(tmp_path):
    model = _native_model(mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=50), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mj.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)


@pytest.mark.parametrize("key", ["use_conv_bias", "use_bias", "residual_in_fp32", "tie_word_embeddings", "rms_norm"])
@pytest.mark.parametrize("text", ["false", "true"])
def test_string_booleans_in_hf_config_are_rejected(hf_dir, key, text):
    _edit_config(hf_dir, lambda c: c.update({key: text}))
    with pytest.raises(ValueError, match=rf"{key}='{text}' must be a JSON boolean"):
        mj.from_pretrained(hf_dir)


@pytest.mark.parametrize("where, key", [("top", "tie_embeddings"), ("top", "residual_in_fp32"),
                                        ("ssm_cfg", "conv_bias"), ("ssm_cfg", "bias")])
def test_string_booleans_in_mamba_ssm_config_are_rejected(tmp_path, where, key):
    hf = _hf_model(seed=9, vocab_size=104)
    path = _write_mamba_ssm(hf, tmp_path / "ssm", vocab_size=100, pad_multiple=8)
    _edit_config(path, lambda c: (c if where == "top" else c["ssm_cfg"]).update({key: "false"}))
    with pytest.raises(ValueError, match=rf"{key}='false' must be a JSON boolean"):
        mj.from_pretrained(path)


def test_string_numbers_in_hf_config_are_rejected(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(layer_norm_epsilon="1e-5"))
    with pytest.raises(ValueError, match=r"layer_norm_epsilon='1e-5' must be a number"):
        mj.from_pretrained(hf_dir)


def test_bfloat16_parity_with_transformers(tmp_path):
    """bf16 weights and compute on both sides, each against transformers in float32."""
    hf = _hf_model(seed=12, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    ids = _ids(101, l=24)
    ref32 = _ref_logits(hf, ids)
    ref16 = _ref_logits(hf.to(torch.bfloat16), ids)
    ours16 = mj.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    got = ours16(jnp.asarray(ids, jnp.int32))
    assert got.dtype == jnp.bfloat16
    err, hf_err = rel_err(np.asarray(got, np.float32), ref32), rel_err(ref16, ref32)
    MEASURED["bf16-vs-fp32-reference"], MEASURED["transformers-bf16-vs-fp32"] = err, hf_err
    assert 1e-4 < err < TOL["bfloat16"], err  # really bf16 (not silently float32), within the bf16 tolerance
    assert rel_err(np.asarray(got, np.float32), ref16) < 2 * TOL["bfloat16"]
    assert (np.asarray(got, np.float32)[..., :101].argmax(-1) == ref32.argmax(-1)).mean() > 0.9
