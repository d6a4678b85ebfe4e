"""Strategy tables of the shared layers and of every model under several parallel layouts, as plain data.

The expected entries are written out per layer kind below (which logical axis each primitive input carries, as mesh
degrees): d = data parallel, m = model parallel, v = vocabulary split (m, or 1 with vocab_parallel off),
e = expert parallel. MindSpore accepts and ignores the annotations in stand-alone mode, so building and annotating
the models runs here; compiling them sharded needs Ascend. The models are built with the attention core that
``attention_impl: auto`` and ``moe.dispatch_impl: auto`` resolve to there (``reference``; on CPU they would be the
fused kernels).
"""
import pytest

from ms_llm.config import ModelConfig, MoEConfig, ParallelConfig
from ms_llm.parallel.sharding import Sharder, apply

LAYOUTS = {
    "dp8": dict(data_parallel=8),
    "dp2_mp4": dict(data_parallel=2, model_parallel=4),
    "dp2_mp4_novocab": dict(data_parallel=2, model_parallel=4, vocab_parallel=False),
    "dp4_mp2_ep2": dict(data_parallel=4, model_parallel=2, expert_parallel=2),
}


def degrees(layout):
    kw = LAYOUTS[layout]
    d, m, e = kw.get("data_parallel", 1), kw.get("model_parallel", 1), kw.get("expert_parallel", 1)
    return d, m, (m if kw.get("vocab_parallel", True) else 1), e


def table(model, layout):
    return apply(model, Sharder(ParallelConfig(mode="semi_auto_parallel", **LAYOUTS[layout])))


# ----------------------------------------------------------------------------------------- expected, per layer kind
def lin(p, d, i, o, bias=True):
    """Linear: x (tokens, in) split (d, i); weight (out, in) split (o, i); bias add on (tokens, out)."""
    t = {f"{p}.matmul": ((d, i), (o, i))}
    if bias:
        t[f"{p}.bias_add"] = ((d, o), (o,))
    return t


def attention(p, d, m, bias=True, decode=False):
    """Column-parallel q/k/v (heads split m), row-parallel output, per-head cores split (batch d, heads m)."""
    t = {f"{p}.transpose": ((d, 1, m, 1),), f"{p}.merge_transpose": ((d, m, 1, 1),)}
    for n in ("q", "k", "v"):
        t.update(lin(f"{p}.{n}_proj", d, 1, m, bias))
    t.update(lin(f"{p}.o_proj", d, m, 1, bias))
    for core in ("core", "decode_core") if decode else ("core",):
        t[f"{p}.{core}.qk"] = ((d, m, 1, 1), (d, m, 1, 1))
        t[f"{p}.{core}.pv"] = ((d, m, 1, 1), (d, m, 1, 1))
    return t


def ffn(p, d, m, bias=True):
    return {**lin(f"{p}.fc_in", d, 1, m, bias), **lin(f"{p}.fc_out", d, m, 1, bias)}


def moe(p, d, m, e):
    """Router replicated over experts; dispatcher moves (batch) -> (expert) sharding; experts split (e, -, m)."""
    return {f"{p}.router.gate.matmul": ((d, 1), (1, 1)),
            f"{p}.dispatcher.slots.gather": ((d, 1, 1), (d, 1)),
            f"{p}.dispatcher.slots.to_expert_major": ((d, e, 1, 1),),
            f"{p}.dispatcher.slots.to_group_major": ((e, d, 1, 1),),
            f"{p}.experts.bmm_in": ((e, 1, 1), (e, 1, m)),
            f"{p}.experts.bmm_out": ((e, 1, m), (e, m, 1))}


def layernorm(p, d):
    return {f"{p}.norm": ((d, 1, 1), (1,), (1,))}


def rmsnorm(p, d):
    return {f"{p}.square": ((d, 1, 1),), f"{p}.mul_w": ((d, 1, 1), (1,))}


def gather(p, d, rows):
    return {f"{p}.gather": ((rows, 1), (d, 1))}


# ------------------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("layout", ["dp8", "dp2_mp4"])
def test_layer_tables(layout):
    from ms_llm.layers.attention import Attention
    from ms_llm.layers.embedding import Embedding
    from ms_llm.layers.linear import Linear
    from ms_llm.layers.mlp import FeedForward
    from ms_llm.layers.norm import LayerNorm, RMSNorm
    d, m, v, _ = degrees(layout)
    cfg = ModelConfig(hidden_size=16, num_heads=4, ffn_hidden_size=32, dropout=0.0, attention_impl="reference")
    assert table(Linear(16, 32, "embed", "mlp"), layout) == {"matmul": ((d, 1), (m, 1)), "bias_add": ((d, m), (m,))}
    assert table(Linear(32, 16, "mlp", "embed", has_bias=False), layout) == {"matmul": ((d, m), (1, m))}
    assert table(Embedding(64, 16), layout) == {"gather": ((v, 1), (d, 1))}
    assert table(LayerNorm(16), layout) == {"norm": ((d, 1, 1), (1,), (1,))}
    assert table(RMSNorm(16), layout) == {"square": ((d, 1, 1),), "mul_w": ((d, 1, 1), (1,))}
    assert table(FeedForward(16, 32, "gelu"), layout) == {k[1:]: s for k, s in ffn("", d, m).items()}
    gated = table(FeedForward(16, 32, "swiglu", has_bias=False), layout)
    assert gated == {"fc_in.matmul": ((d, 1), (m, 1)), "fc_gate.matmul": ((d, 1), (m, 1)),
                     "fc_out.matmul": ((d, m), (1, m))}
    assert table(Attention(cfg, causal=True), layout) == {k[1:]: s for k, s in attention("", d, m, decode=True).items()}


def test_sharder_annotates_primitives_and_rejects_unknown_axes():
    from ms_llm.layers.linear import Linear
    lin_cell = Linear(16, 32, "embed", "heads")
    table(lin_cell, "dp2_mp4")
    assert lin_cell.matmul.in_strategy == ((2, 1), (4, 1))
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        table(Linear(16, 32, "hidden", "mlp"), "dp8")


# ------------------------------------------------------------------------------------------------------- models
def tiny(arch, **kw):
    base = dict(arch=arch, vocab_size=64, hidden_size=16, num_layers=1, num_heads=4, ffn_hidden_size=32,
                max_position_embeddings=8, dropout=0.0, attention_impl="reference")   # auto on Ascend
    base.update(kw)
    return ModelConfig(**base)


def block(p, d, m, norm=layernorm, bias=True, cross=False, ffn_table=None, decode=False):
    t = {**attention(f"{p}.self_attn", d, m, bias, decode=decode), **norm(f"{p}.attn_norm", d),
         **norm(f"{p}.ffn_norm", d)}
    if cross:
        t.update(attention(f"{p}.cross_attn", d, m, bias))
        t.update(norm(f"{p}.cross_norm", d))
    t.update(ffn_table if ffn_table is not None else ffn(f"{p}.ffn", d, m, bias))
    return t


def gpt_expected(d, m, v, e):
    return {"logits_matmul": ((d, 1), (v, 1)),
            **gather("decoder.embed_tokens", d, v), **gather("decoder.embed_positions", d, 1),
            **block("decoder.blocks.0", d, m, decode=True), **layernorm("decoder.final_norm", d)}


def glam_expected(d, m, v, e):
    t = gpt_expected(d, m, v, e)
    for k in list(ffn("decoder.blocks.0.ffn", d, m)):
        del t[k]
    t.update(moe("decoder.blocks.0.ffn", d, m, e))
    return t


def bert_expected(d, m, v, e):
    return {**gather("bert.embeddings.word_embeddings", d, v), **gather("bert.embeddings.position_embeddings", d, 1),
            **gather("bert.embeddings.token_type_embeddings", d, 1), **layernorm("bert.embeddings.norm", d),
            **block("bert.layers.0", d, m),
            "bert.pooler.tanh": ((d, 1),), **lin("bert.pooler.dense", d, 1, 1),
            "mlm_head.matmul": ((d, 1), (v, 1)), "mlm_head.add": ((d, v), (v,)),
            **lin("mlm_head.dense", d, 1, 1), **layernorm("mlm_head.norm", d),
            "nsp_head.matmul": ((d, 1), (1, 1)), "nsp_head.bias_add": ((d, 1), (1,))}


def transformer_expected(d, m, v, e):
    return {"logits_matmul": ((d, 1), (v, 1)), **gather("embed_tokens", d, v), **gather("embed.positions", d, 1),
            **block("encoder.blocks.0", d, m), **layernorm("encoder.final_norm", d),
            **block("decoder.blocks.0", d, m, cross=True, decode=True), **layernorm("decoder.final_norm", d)}


def switch_expected(d, m, v, e):
    return {"logits_matmul": ((d, 1), (v, 1)), **gather("embed_tokens", d, v),
            **block("encoder.blocks.0", d, m, norm=rmsnorm, bias=False,
                    ffn_table=moe("encoder.blocks.0.ffn", d, m, e)),
            **rmsnorm("encoder.final_norm", d),
            **block("decoder.blocks.0", d, m, norm=rmsnorm, bias=False, cross=True, decode=True,
                    ffn_table=moe("decoder.blocks.0.ffn", d, m, e)),
            **rmsnorm("decoder.final_norm", d)}


def build(name):
    # dispatch_impl: what auto resolves to on Ascend
    one_moe = MoEConfig(num_experts=4, top_k=2, moe_every=1, moe_offset=0, dispatch_impl="reference")
    if name == "gpt":
        from ms_llm.models.gpt import GPTLMHeadModel
        return GPTLMHeadModel(tiny("gpt"))
    if name == "glam":
        from ms_llm.models.glam import GLaM
        return GLaM(tiny("glam", moe=one_moe))
    if name == "bert":
        from ms_llm.models.bert import BertForPreTraining
        return BertForPreTraining(tiny("bert", type_vocab_size=2, pre_norm=False))
    if name == "transformer":
        from ms_llm.models.transformer import Transformer
        return Transformer(tiny("transformer", num_decoder_layers=1))
    from ms_llm.models.switch import SwitchTransformer
    return SwitchTransformer(tiny("switch", num_decoder_layers=1, position_embedding="relative", norm="rmsnorm",
                                  use_bias=False, moe=MoEConfig(num_experts=4, top_k=1, moe_every=1, moe_offset=0,
                                                                dispatch_impl="reference")))


EXPECTED = {"gpt": gpt_expected, "glam": glam_expected, "bert": bert_expected, "transformer": transformer_expected,
            "switch": switch_expected}
CASES = [(n, l) for n in ("gpt", "bert", "transformer") for l in ("dp8", "dp2_mp4", "dp2_mp4_novocab")] + \
        [(n, l) for n in ("glam", "switch") for l in ("dp8", "dp2_mp4", "dp4_mp2_ep2")]


@pytest.mark.parametrize("name,layout", CASES)
def test_model_tables(name, layout):
    got = table(build(name), layout)
    want = EXPECTED[name](*degrees(layout))
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k] == want[k], (k, got[k], want[k])
