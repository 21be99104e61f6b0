"""factors/ against Hugging Face transformers' own rope init functions (the reference)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from factors import RopeGeometry, inv_freq, ntk_set, pi_set, sets_from_hf_config, yarn_set  # noqa: E402

TOL = 1e-6


def _assert_inv_freq(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    rel = ((ours - theirs.double()).abs() / theirs.double().abs()).max().item()
    assert rel <= TOL, f"relative inv_freq difference {rel:.3g} > {TOL}"


def _llama(rope_parameters: dict, head_dim: int = 64, max_pos: int = 4096) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )


@pytest.mark.parametrize("factor", [2.0, 8.0, 32.0])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_linear_is_pi(factor: float, theta: float) -> None:
    cfg = _llama({"rope_type": "linear", "factor": factor, "rope_theta": theta})
    ref, att = ROPE_INIT_FUNCTIONS["linear"](cfg, "cpu")
    fs = pi_set(RopeGeometry(theta, 64, 4096), int(4096 * factor))
    _assert_inv_freq(inv_freq(fs), ref)
    assert math.isclose(fs.resolved_mscale, att, rel_tol=TOL, abs_tol=TOL)


@pytest.mark.parametrize("factor,seq_len", [(1.0, 16384), (2.0, 8192), (4.0, 32768), (8.0, 4096)])
def test_dynamic_is_ntk(factor: float, seq_len: int) -> None:
    cfg = _llama({"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0})
    ref, att = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)
    fs = ntk_set(RopeGeometry(10000.0, 64, 4096), seq_len, factor=factor)
    _assert_inv_freq(inv_freq(fs), ref)
    assert math.isclose(fs.resolved_mscale, att, rel_tol=TOL)


@pytest.mark.parametrize(
    "extra",
    [{}, {"beta_fast": 16, "beta_slow": 2}, {"mscale": 0.707, "mscale_all_dim": 1.0}, {"attention_factor": 1.3}],
)
@pytest.mark.parametrize("factor", [4.0, 16.0])
def test_yarn(extra: dict, factor: float) -> None:
    orig = 4096
    rp = {
        "rope_type": "yarn",
        "factor": factor,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": orig,
        **extra,
    }
    cfg = _llama(rp, head_dim=128, max_pos=int(orig * factor))
    ref, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    kwargs = {k: v for k, v in extra.items()}
    fs = yarn_set(RopeGeometry(10000.0, 128, orig), int(orig * factor), **kwargs)
    _assert_inv_freq(inv_freq(fs), ref)
    assert math.isclose(fs.resolved_mscale, att, rel_tol=TOL)


def _phi3_config(partial: float = 1.0, attention_factor: float | None = None) -> Phi3Config:
    head_dim, orig, max_pos = 96, 4096, 131072
    rotary = int(head_dim * partial)
    gen = torch.Generator().manual_seed(0)
    short = (1 + torch.rand(rotary // 2, generator=gen).sort().values).tolist()
    long = (1 + 30 * torch.rand(rotary // 2, generator=gen).sort().values).tolist()
    rp = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": short,
        "long_factor": long,
        "original_max_position_embeddings": orig,
        "partial_rotary_factor": partial,
    }
    if attention_factor is not None:
        rp["attention_factor"] = attention_factor
    return Phi3Config(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        rope_parameters=rp,
        partial_rotary_factor=partial,
    )


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("attention_factor", [None, 1.19])
def test_longrope_short_and_long(partial: float, attention_factor: float | None) -> None:
    cfg = _phi3_config(partial, attention_factor)
    short_ref, att_short = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")  # seq_len None: short
    long_ref, att_long = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=4097)
    short, long = sets_from_hf_config(cfg.to_dict())
    assert short.rotary_dim == long.rotary_dim == int(96 * partial)
    assert short.max_len == 4096 and long.max_len == 131072
    _assert_inv_freq(inv_freq(short), short_ref)
    _assert_inv_freq(inv_freq(long), long_ref)
    # One attention factor serves both sets, as in transformers.
    assert math.isclose(short.resolved_mscale, att_short, rel_tol=TOL)
    assert math.isclose(long.resolved_mscale, att_long, rel_tol=TOL)
    assert att_short == att_long
