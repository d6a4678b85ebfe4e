"""The Attention layer (projections, GQA, RoPE, masks) against an independent numpy transcription (tol 1e-5), with
the reference core (heads as (B, nh, S, hd)) and the fused one (heads as (B, S, nh, hd), no transposes)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ms_llm.config import ModelConfig
from ms_llm.kernels.attention import resolve_attention_impl
from ms_llm.layers.attention import Attention


def np_rope(x, pos, theta):
    # x (B, nh, S, hd); rotate-half layout: pairs (i, i + hd/2)
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None, :, None] * inv[None, None, None, :]          # (B, 1, S, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(layer, x, kv, key_mask, causal, band, rope_theta=None):
    w = {n: p.asnumpy().astype(np.float64) for n, p in layer.parameters_and_names()}
    nh, nkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    b, sq, _ = x.shape
    sk = kv.shape[1]

    def proj(name, t, heads):
        y = t @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)
        return y.reshape(b, t.shape[1], heads, hd).transpose(0, 2, 1, 3)

    q, k, v = proj("q_proj", x, nh), proj("k_proj", kv, nkv), proj("v_proj", kv, nkv)
    if rope_theta is not None:
        pos = np.broadcast_to(np.arange(sq), (b, sq)).astype(np.float64)
        q, k = np_rope(q, pos, rope_theta), np_rope(k, pos, rope_theta)
    k = np.repeat(k, nh // nkv, axis=1)
    v = np.repeat(v, nh // nkv, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    vis = key_mask[:, None, None, :] > 0
    if causal:
        vis = vis & (j <= i + sk - sq)
    if band:
        vis = vis & (j > i + sk - sq - band)
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(b, sq, nh * hd)
    return o @ w["o_proj.weight"].T + w.get("o_proj.bias", 0.0)


@pytest.mark.parametrize("kv_heads,rotary,causal,band,cross", [
    (None, False, False, 0, False),      # BERT-style padding-masked self-attention
    (None, False, True, 0, False),       # GPT causal
    (None, False, True, 3, False),       # GPT-3 banded layer
    (2, True, True, 0, False),           # Llama: GQA + RoPE
    (None, False, False, 0, True),       # decoder cross-attention, Sk != Sq
])
@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_attention_layer_matches_numpy(rng, kv_heads, rotary, causal, band, cross, impl):
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=kv_heads, attention_impl=impl,
                      position_embedding="rotary" if rotary else "learned", max_position_embeddings=16)
    layer = Attention(cfg, causal=causal, band_width=band, cross=cross)
    assert layer.layout == ("BSND" if resolve_attention_impl(impl) == "fused" else "BNSD")   # auto: fused on CPU
    for _, p in layer.parameters_and_names():
        if p.requires_grad:
            p.set_data(Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    b, sq, sk = 2, 7, 9 if cross else 7
    x = rng.normal(size=(b, sq, 32)).astype(np.float32)
    kv = rng.normal(size=(b, sk, 32)).astype(np.float32) if cross else x
    key_mask = np.ones((b, sk), np.float32)
    key_mask[1, -2:] = 0.0
    pos = np.broadcast_to(np.arange(sq, dtype=np.int32), (b, sq)).copy()
    got = layer(Tensor(x), Tensor(kv), Tensor(key_mask), Tensor(pos)).asnumpy()
    want = np_attention(layer, x.astype(np.float64), kv.astype(np.float64), key_mask, causal, band,
                        cfg.rope_theta if rotary else None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
