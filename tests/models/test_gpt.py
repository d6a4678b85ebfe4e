"""Decoder-only GPT: GPT-3 family sizes (Brown et al. 2020 Table 2.1), banded attention against a numpy
transcription of the model, the block / FFN hooks GLaM builds on, config errors."""
import dataclasses
import math
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_llm.config import ModelConfig, load_config
from ms_llm.models.gpt import GPTLMHeadModel, GPTModel, gpt_param_count, layer_band_width

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
TINY = ModelConfig(arch="gpt", vocab_size=61, hidden_size=16, num_layers=4, num_heads=2, ffn_hidden_size=32,
                   max_position_embeddings=16, activation="gelu", dropout=0.0, initializer_range=0.3,
                   attention_pattern="alternating_banded", band_width=3)


def n_params(model):
    return sum(int(np.prod(p.shape)) for p in model.trainable_params())


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("changes", [
    {},
    {"norm": "rmsnorm", "position_embedding": "rotary", "activation": "swiglu", "num_kv_heads": 1,
     "tie_word_embeddings": False, "use_bias": False},
    {"head_dim": 6, "norm_bias": False, "position_embedding": "sinusoidal", "final_norm": False},
    {"position_embedding": "none", "activation": "geglu", "num_heads": 4, "num_kv_heads": 2},
])
def test_count_formula_matches_built_model(changes):
    cfg = dataclasses.replace(TINY, **changes)
    assert gpt_param_count(cfg) == n_params(GPTLMHeadModel(cfg))


# Table 2.1: name, n_params, n_layers, d_model, n_heads, d_head. XL keeps d_head 128 with 16 heads (the table's 24
# heads x 128 contradicts d_model 2048; see configs/gpt/gpt3_xl.yaml); 13B keeps d_model 5140 with 40 x 128 heads.
GPT3 = [("small", 125e6, 12, 768, 12, 64), ("medium", 350e6, 24, 1024, 16, 64), ("large", 760e6, 24, 1536, 16, 96),
        ("xl", 1.3e9, 24, 2048, 16, 128), ("2.7b", 2.7e9, 32, 2560, 32, 80), ("6.7b", 6.7e9, 32, 4096, 32, 128),
        ("13b", 13.0e9, 40, 5140, 40, 128), ("175b", 175.0e9, 96, 12288, 96, 128)]


@pytest.mark.parametrize("name,paper,layers,d_model,heads,d_head", GPT3)
def test_gpt3_family_configs(name, paper, layers, d_model, heads, d_head):
    run = load_config(os.path.join(ROOT, "configs", "gpt", f"gpt3_{name}.yaml"))
    m = run.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.dim_per_head) == (layers, d_model, heads, d_head)
    assert (m.max_position_embeddings, m.vocab_size, run.data.seq_length) == (2048, 50257, 2048)
    assert m.ffn_hidden_size == 4 * d_model and m.tie_word_embeddings and m.pre_norm
    assert m.position_embedding == "learned" and m.attention_pattern == "alternating_banded"
    assert abs(gpt_param_count(m) - paper) / paper < 0.03


def test_tiny_config_builds():
    run = load_config(os.path.join(ROOT, "configs", "gpt", "tiny.yaml"))
    assert run.data.task == "causal_lm" and run.model.attention_pattern == "alternating_banded"
    assert n_params(GPTLMHeadModel(run.model)) == gpt_param_count(run.model) < 2_000_000


def test_dropout_sites_are_gpt2s():
    """GPT-2 (HF GPT2Block / GPT2MLP) drops out the embeddings, each sub-layer's output and no FFN activation."""
    model = GPTModel(dataclasses.replace(TINY, dropout=0.1))
    for block in model.blocks:
        assert not isinstance(block.drop, nn.Identity)                 # attention output and FFN output
        assert isinstance(block.ffn.dropout, nn.Identity)              # not the intermediate (B, S, F) activation


def test_alternating_pattern_bands_odd_layers():
    assert [layer_band_width(TINY, i) for i in range(4)] == [0, 3, 0, 3]
    model = GPTLMHeadModel(TINY)
    assert [b.self_attn.core.band_width for b in model.decoder.blocks] == [0, 3, 0, 3]
    dense = dataclasses.replace(TINY, attention_pattern="dense")
    assert [layer_band_width(dense, i) for i in range(4)] == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------- numerics
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def numpy_gpt(p, cfg, ids, mask, band_widths, skip_ffn=()):
    """Independent float64 transcription of the pre-norm GPT forward: learned positions, GELU (erf), tied head;
    query i attends to keys j with mask[j] = 1, j <= i and, in a banded layer, j > i - band_width."""
    b, s = ids.shape
    nh, hd = cfg.num_heads, cfg.dim_per_head
    x = p["decoder.embed_tokens.weight"][ids] + p["decoder.embed_positions.weight"][np.arange(s)][None]
    i_idx, j_idx = np.arange(s)[:, None], np.arange(s)[None, :]
    for layer, bw in enumerate(band_widths):
        pre = f"decoder.blocks.{layer}."

        def lin(name, v):
            return v @ p[pre + name + ".weight"].T + p[pre + name + ".bias"]

        h = _ln(x, p[pre + "attn_norm.weight"], p[pre + "attn_norm.bias"], cfg.norm_eps)
        q, k, v = (lin(f"self_attn.{n}_proj", h).reshape(b, s, nh, hd).transpose(0, 2, 1, 3) for n in "qkv")
        allowed = (j_idx <= i_idx) & ((j_idx > i_idx - bw) if bw else True)         # (S, S)
        allowed = allowed[None, None] & (mask[:, None, None, :] > 0)                # (B, 1, S, S)
        scores = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True)) * allowed
        probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)          # a query seeing no key outputs 0
        att = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, nh * hd)
        x = x + lin("self_attn.o_proj", att)
        if layer not in skip_ffn:
            h = _ln(x, p[pre + "ffn_norm.weight"], p[pre + "ffn_norm.bias"], cfg.norm_eps)
            u = lin("ffn.fc_in", h)
            x = x + lin("ffn.fc_out", 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0))))
    x = _ln(x, p["decoder.final_norm.weight"], p["decoder.final_norm.bias"], cfg.norm_eps)
    return x @ p["decoder.embed_tokens.weight"].T


def _params(model):
    return {n: p.asnumpy().astype(np.float64) for n, p in model.parameters_and_names()}


def test_banded_forward_matches_numpy(rng):
    model = GPTLMHeadModel(TINY)
    model.init_weights(0)
    for n, p in model.parameters_and_names():   # non-trivial biases and norm gains
        if len(p.shape) == 1:
            p.set_data(Tensor(rng.normal(0.0, 0.3, p.shape).astype(np.float32) + (1.0 if "norm.weight" in n else 0)))
    model.set_train(False)
    ids = rng.integers(0, TINY.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.float32)
    mask[1, 6:] = 0                                                                  # right padding
    out = model(Tensor(ids.astype(np.int32)), Tensor(mask))
    assert list(out.keys()) == ["logits"]
    logits = out.logits.asnumpy()
    p = _params(model)
    ref = numpy_gpt(p, TINY, ids, mask, [0, 3, 0, 3])
    # fp32 model vs float64 transcription: differences ~1e-6 observed
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    # the band matters at this length: an all-dense transcription is far off
    dense_ref = numpy_gpt(p, TINY, ids, mask, [0, 0, 0, 0])
    assert np.abs(logits - dense_ref).max() > 1e-2


class ZeroFFN(nn.Cell):
    """A feed-forward replacement that contributes nothing (and reports an aux loss of 0.5)."""

    def construct(self, x):
        return x * 0.0, ops.ones((), ms.float32) * 0.5


def test_make_ffn_hook_replaces_the_layer_ffn(rng):
    model = GPTLMHeadModel(TINY, make_ffn=lambda cfg, i: (ZeroFFN(), True) if i == 2 else None)
    assert isinstance(model.decoder.blocks[2].ffn, ZeroFFN)
    assert not any(n.startswith("decoder.blocks.2.ffn.") for n, _ in model.parameters_and_names())
    model.set_train(False)
    ids = rng.integers(0, TINY.vocab_size, (1, 9))
    hidden, aux = model.decoder(Tensor(ids.astype(np.int32)))
    assert float(aux.asnumpy()) == pytest.approx(0.5)
    logits = model.project(hidden).asnumpy()
    ref = numpy_gpt(_params(model), TINY, ids, np.ones((1, 9)), [0, 3, 0, 3], skip_ffn=(2,))
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


class TaggedGPT(GPTModel):
    def make_block(self, cfg, i):
        block = super().make_block(cfg, i)
        block.layer_tag = i
        return block


def test_make_block_is_overridable():
    model = TaggedGPT(TINY)
    assert [b.layer_tag for b in model.blocks] == [0, 1, 2, 3]


def test_init_weights_is_seeded_and_leaves_frozen_tables():
    cfg = dataclasses.replace(TINY, position_embedding="rotary")
    a, b = GPTLMHeadModel(cfg), GPTLMHeadModel(cfg)
    a.init_weights(7)
    b.init_weights(7)
    pa, pb = _params(a), _params(b)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)
    assert np.all(pa["decoder.blocks.0.attn_norm.weight"] == 1) and np.all(pa["decoder.blocks.0.ffn.fc_in.bias"] == 0)
    std_out = pa["decoder.blocks.0.self_attn.o_proj.weight"].std()
    std_in = pa["decoder.blocks.0.self_attn.q_proj.weight"].std()
    assert std_out < std_in / 2                      # GPT-2's residual scaling 1/sqrt(2 * 4 layers)
    cos = pa["decoder.blocks.0.self_attn.rotary.cos"]
    assert cos[0, 0] == 1.0 and cos[1, 0] == pytest.approx(math.cos(1.0), abs=1e-6)


@pytest.mark.parametrize("changes,key", [({"position_embedding": "relative"}, "model.position_embedding"),
                                         ({"type_vocab_size": 2}, "model.type_vocab_size")])
def test_unsupported_settings_are_named(changes, key):
    with pytest.raises(ValueError, match=key):
        GPTLMHeadModel(dataclasses.replace(TINY, **changes))
