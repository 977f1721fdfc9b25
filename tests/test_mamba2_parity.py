"""Mamba-2 checkpoints against transformers' ``Mamba2ForCausalLM`` on CPU: logits parity
(groups, lengths that are not multiples of the chunk, tied and untied, float32 and
bfloat16), the round trip back into transformers, mamba_ssm ``Mamba2`` directories
(random small checkpoints built with transformers).

torch and transformers are test dependencies (as in test_interop): this module
fails, it does not skip, when they are missing.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TOL, rel_err
from test_mamba2 import _ids, _native, _tiny

import mamba_jax as mj

PARITY_TOL = 1e-4  # float32 logits vs transformers, relative error (as test_interop)
transformers.logging.set_verbosity_error()
MEASURED: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("print_measured")


# --------------------------------------------------------------------------- checkpoints vs transformers


def _hf_mamba2(seed=0, **kw) -> transformers.Mamba2ForCausalLM:
    """A random transformers Mamba2 with the per-head parameters and norms perturbed away from their init."""
    torch.manual_seed(seed)
    cfg = dict(num_heads=4, head_dim=16, hidden_size=32, expand=2, state_size=8, n_groups=1, num_hidden_layers=2,
               vocab_size=96, chunk_size=8, conv_kernel=4, tie_word_embeddings=False)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p) if "A_log" not in name else 0.3 * torch.rand_like(p))
    return model


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


HF_CASES = {
    "g1-untied-l21": (dict(), 21),
    "g1-tied-l21": (dict(tie_word_embeddings=True), 21),
    "g2-untied-l19": (dict(n_groups=2), 19),
    "g4-tied-l30-bias-dtlimit": (dict(n_groups=4, use_bias=True, time_step_limit=(0.01, 0.3)), 30),
    "g2-noconvbias-k3-l5": (dict(n_groups=2, use_conv_bias=False, conv_kernel=3, layer_norm_epsilon=1e-6), 5),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_mamba2_parity(case, tmp_path):
    kw, length = HF_CASES[case]
    hf = _hf_mamba2(**kw)
    hf.save_pretrained(tmp_path)
    model = mj.from_pretrained(tmp_path)
    assert model.config.layer == "mamba2" and model.config.chunk_size == 8
    ids = _ids(96, l=length)
    err = rel_err(np.asarray(model(ids))[..., :96], _ref_logits(hf, ids))
    MEASURED[f"hf-mamba2 {case} float32"] = err
    assert err < PARITY_TOL, err


def test_hf_mamba2_parity_bfloat16(tmp_path):
    """bf16 parameters and compute against transformers in float32 (the rounding of bf16 only)."""
    hf = _hf_mamba2(n_groups=2)
    hf.save_pretrained(tmp_path)
    model = mj.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    ids = _ids(96, l=21)
    ours = np.asarray(model(ids).astype(jnp.float32))[..., :96]
    ref = _ref_logits(hf, ids)
    err = rel_err(ours, ref)
    theirs = rel_err(_ref_logits(hf.to(torch.bfloat16), ids), ref)  # transformers' own bf16 rounding
    MEASURED["hf-mamba2 g2-untied-l21 bfloat16 vs float32 reference"] = err
    MEASURED["transformers Mamba2 in bfloat16 vs float32 (for scale)"] = theirs
    assert err < TOL["bfloat16"] and err < 1.5 * theirs, (err, theirs)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_through_transformers(tied, tmp_path):
    cfg = _tiny(ngroups=2, tie_embeddings=tied, dt_limit=(0.001, 0.5), vocab_size=90)
    model = _native(cfg, seed=6)
    mj.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mamba2" and config["architectures"] == ["Mamba2ForCausalLM"]
    back = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    assert tuple(back.config.time_step_limit) == (0.001, 0.5)
    ids = _ids(90, l=19)
    err = rel_err(_ref_logits(back, ids), np.asarray(model(ids)))
    MEASURED[f"round trip {'tied' if tied else 'untied'}"] = err
    assert err < PARITY_TOL, err
    again = mj.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
    # transformers' own save, loaded again here: its time_step_limit inf is {"__float__": "Infinity"}
    back.config.time_step_limit = (0.0, float("inf"))
    back.save_pretrained(tmp_path / "hf")
    assert mj.from_pretrained(tmp_path / "hf").config.dt_limit == (0.0, float("inf"))


def test_mamba_ssm_mamba2_directory(tmp_path):
    """The layout of mamba_ssm's MambaLMHeadModel.save_pretrained with ssm_cfg.layer == "Mamba2"."""
    hf = _hf_mamba2(seed=7, n_groups=2, tie_word_embeddings=True)
    path = tmp_path / "ssm"
    path.mkdir()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, path / "pytorch_model.bin")
    c = hf.config
    config = {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": 96,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim, "ngroups": c.n_groups,
                    "chunk_size": c.chunk_size, "expand": 2, "d_conv": 4},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config))
    model = mj.from_pretrained(path)
    assert model.config.ngroups == 2 and model.config.padded_vocab_size == 96
    ids = _ids(96, l=13)
    err = rel_err(np.asarray(model(ids)), _ref_logits(hf, ids))
    MEASURED["mamba_ssm Mamba2 directory"] = err
    assert err < PARITY_TOL, err
    config["ssm_cfg"]["dt_rank"] = 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown Mamba2 ssm_cfg key 'dt_rank'"):
        mj.from_pretrained(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_heads": 3}, r"num_heads=3 is not supported"),
        ({"time_step_limit": [0.1]}, r"time_step_limit=\[0.1\]"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({"model_type": "mamba3"}, r"model_type='mamba3' is not supported"),
    ],
)
def test_error_unsupported_hf_mamba2_config(change, match, tmp_path):
    _hf_mamba2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        mj.from_pretrained(tmp_path)
