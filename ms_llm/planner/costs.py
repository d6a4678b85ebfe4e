"""Parameter counts, FLOPs and per-layer activation coefficients of a ModelShape.

FLOPs are matmul FLOPs only (2 per multiply-add); norms, softmax, biases and element-wise ops are not counted,
as in Megatron-LM's accounting (Narayanan et al. 2021, appendix: "we only consider the matrix
multiplications"). Attention scores are counted dense over the full sequence (4*s*h per token per layer for
QK^T and attention-over-values), as Megatron does, whatever the causal mask or banded layers skip.

Per training step:
* forward = F, backward = 2F (gradients w.r.t. inputs and weights);
* full recompute re-runs the forward of every transformer layer (not the embedding / LM head): +F_layers;
* selective recompute (Korthikanti et al. 2022) re-runs only the attention core (QK^T, softmax, AV): +F_scores.
``model`` FLOPs (for MFU) exclude recomputation; ``hardware`` FLOPs (for achieved TFLOPS, Megatron's and
PaLM's HFU) include it.

For GPT with full recompute the hardware count equals Megatron's formula
``96 B s l h^2 (1 + s/(6h) + V/(16 l h))`` exactly (see :func:`megatron_gpt_flops`); ``6 N D`` (Kaplan et al.
2020) is reported beside it as the usual approximation of *model* FLOPs and is not used by the time model.

MoE experts run as one batched matmul over padded ``(E, C, H)`` slots (DESIGN.md, MoE), so expert FLOPs scale
with ``top_k * capacity_factor`` routed slots per token, and the router adds ``2 h E`` per token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

from .shape import ModelShape

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class LayerSpec:
    """Sizes of one transformer layer as the cost model sees it."""
    kind: str                 # 'enc' (self-attn + FFN), 'dec' (decoder-only, same blocks), 'xdec' (+ cross-attn)
    moe: bool                 # sparse FFN
    params_tp: int            # parameters split by tensor parallel (projections of attention and dense FFN)
    params_rep: int           # parameters replicated across tensor-parallel ranks (norms, router)
    params_expert: int        # expert FFN parameters (split over expert-parallel x tensor-parallel ranks)
    params_active_expert: int  # expert parameters a token passes through (top_k experts)
    fwd_flops: float          # forward matmul FLOPs per token (experts: top_k * capacity_factor slots)
    score_flops: float        # forward FLOPs per token of QK^T and AV (re-run by selective recompute)
    tp_allreduces: int        # tensor-parallel all-reduces per forward (one per attention / FFN block)
    act_lin: float            # activation bytes per (s*b*h) of one micro-batch, no parallelism
    act_lin_nonsplit: float   # part of act_lin that tensor parallel does not split (without sequence parallel)
    act_sq: float             # activation bytes per (a*s^2*b) (attention scores, softmax, dropout mask)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements, not bytes)."""
    embedding: int            # word + position + segment + relative-bias tables + embedding norm
    layers: int               # all transformer layers, experts included
    experts: int              # expert FFN weights (subset of ``layers``)
    head: int                 # final norms, untied LM head, BERT pooler / MLM / NSP heads
    bert_pretraining_heads: int  # BERT MLM transform + bias and NSP classifier (subset of ``head``)
    total: int
    activated: int            # parameters one token passes through (MoE: top_k experts per MoE layer)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (whole model, all devices)."""
    tokens: int               # global_batch * seq_length
    forward: float            # layers + head, forward
    backward: float           # 2 * forward
    recompute: float          # extra forward work of activation recomputation
    model: float              # forward + backward (MFU numerator)
    hardware: float           # model + recompute (achieved-TFLOPS numerator, Megatron's accounting)
    approx_6nd: float         # 6 * N * tokens (N = activated parameters), the common approximation


def _norm_params(shape: ModelShape) -> int:
    return shape.hidden_size * (2 if shape.norm == "layernorm" and shape.norm_bias else 1)


def _attention_params(shape: ModelShape) -> int:
    h, q, kv = shape.hidden_size, shape.num_heads * shape.dim_per_head, shape.kv_heads * shape.dim_per_head
    weights = h * q + 2 * h * kv + q * h                       # Wq, Wk, Wv, Wo
    return weights + ((q + 2 * kv + h) if shape.use_bias else 0)


def _ffn_params(shape: ModelShape, width: int) -> int:
    h, mats = shape.hidden_size, (3 if shape.gated_ffn else 2)
    return mats * h * width + (((mats - 1) * width + h) if shape.use_bias else 0)


def _attention_flops(shape: ModelShape) -> tuple:
    """(projection FLOPs, score FLOPs) per token of one attention block, forward."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.dim_per_head, shape.kv_heads * shape.dim_per_head
    proj = 2.0 * (h * q + 2 * h * kv + q * h)
    scores = 4.0 * shape.seq_length * q                        # QK^T (2 s q) + probabilities x V (2 s q)
    return proj, scores


def _attention_act(shape: ModelShape) -> tuple:
    """Korthikanti et al. 2022 section 4.1, generalised to GQA / head_dim: (lin, nonsplit, sq) for one block.

    Stored: QKV input 2sbh, Q 2sbq, K and V 2sbkv each (K for QK^T, V for AV), softmax output 2as^2b, its
    dropout mask as^2b and dropout output 2as^2b, output-projection input 2sbq, output dropout mask sbh.
    With q = kv = h this is 11 sbh + 5 as^2b.
    """
    h = shape.hidden_size
    qr = shape.num_heads * shape.dim_per_head / h
    kvr = shape.kv_heads * shape.dim_per_head / h
    lin = 2 + 2 * qr + 2 * kvr + 2 * kvr + 2 * qr + 1
    return lin, 3.0, 5.0


def _ffn_act(shape: ModelShape, width: int) -> tuple:
    """(lin, nonsplit) of one FFN: input 2sbh, activation in/out 2sbf each (gated: gate, up, product), mask sbh.

    With f = 4h and a 2-matrix FFN this is Korthikanti's 19 sbh.
    """
    fr = width / shape.hidden_size
    inner = (6 if shape.gated_ffn else 4) * fr
    return 3.0 + inner, 3.0


@functools.lru_cache(maxsize=256)
def layer_specs(shape: ModelShape) -> Tuple[LayerSpec, ...]:
    """One LayerSpec per layer, encoder layers first, then decoder layers (the pipeline order)."""
    h = shape.hidden_size
    norm = _norm_params(shape)
    attn_p = _attention_params(shape)
    attn_proj_f, attn_score_f = _attention_flops(shape)
    a_lin, a_ns, a_sq = _attention_act(shape)
    mats = 3 if shape.gated_ffn else 2
    dense_p = _ffn_params(shape, shape.ffn_hidden_size)
    dense_f = 2.0 * mats * h * shape.ffn_hidden_size
    d_lin, d_ns = _ffn_act(shape, shape.ffn_hidden_size)
    expert_p = _ffn_params(shape, shape.expert_ffn)
    slots = shape.top_k * shape.capacity_factor
    e_lin, e_ns = _ffn_act(shape, shape.expert_ffn)
    router_p = h * shape.num_experts
    router_act = 4.0 * shape.num_experts / h                   # fp32 router logits, s*b*E*4 bytes

    def make(kind: str, moe: bool) -> LayerSpec:
        n_attn = 2 if kind == "xdec" else 1
        n_norm = n_attn + 1
        if moe:
            ffn_tp, ffn_rep = 0, router_p
            expert, active = shape.num_experts * expert_p, shape.top_k * expert_p
            ffn_f = slots * 2.0 * mats * h * shape.expert_ffn + 2.0 * h * shape.num_experts
            f_lin, f_ns = slots * e_lin + router_act, slots * e_ns + router_act
        else:
            ffn_tp, ffn_rep, expert, active = dense_p, 0, 0, 0
            ffn_f, f_lin, f_ns = dense_f, d_lin, d_ns
        return LayerSpec(
            kind=kind, moe=moe,
            params_tp=n_attn * attn_p + ffn_tp,
            params_rep=n_norm * norm + ffn_rep,
            params_expert=expert,
            params_active_expert=active,
            fwd_flops=n_attn * (attn_proj_f + attn_score_f) + ffn_f,
            score_flops=n_attn * attn_score_f,
            tp_allreduces=n_attn + 1,
            act_lin=n_attn * a_lin + f_lin + 2.0 * n_norm,
            act_lin_nonsplit=n_attn * a_ns + f_ns + 2.0 * n_norm,
            act_sq=n_attn * a_sq,
        )

    first_kind = "enc" if shape.is_encoder_decoder or shape.arch == "bert" else "dec"
    specs = [make(first_kind, shape.is_moe_layer(i)) for i in range(shape.num_layers)]
    specs += [make("xdec", shape.is_moe_layer(i)) for i in range(shape.num_decoder_layers)]
    return tuple(specs)


def embedding_params(shape: ModelShape) -> dict:
    """Embedding-side tables: {'word': V h, 'replicated': positions + segments + relative bias + norm}."""
    h = shape.hidden_size
    stacks = 2 if shape.is_encoder_decoder else 1
    rep = 0
    if shape.position_embedding == "learned":
        rep += stacks * (shape.max_position_embeddings or shape.seq_length) * h
    elif shape.position_embedding == "relative":
        rep += stacks * shape.relative_num_buckets * shape.num_heads
    rep += shape.type_vocab_size * h
    if shape.arch == "bert":
        rep += _norm_params(shape)                              # embedding LayerNorm
    return {"word": shape.vocab_size * h, "replicated": rep}


def head_params(shape: ModelShape) -> dict:
    """Output side: {'tp': untied LM head (vocab-split), 'replicated': final norms, BERT heads, 'bert_pretraining'}."""
    h, V = shape.hidden_size, shape.vocab_size
    stacks = 2 if shape.is_encoder_decoder else 1
    rep = stacks * _norm_params(shape) if (shape.pre_norm and shape.final_norm) else 0
    tp = 0 if shape.tie_word_embeddings else V * h
    bert_heads = 0
    if shape.arch == "bert":
        pooler = h * h + h
        mlm = h * h + h + _norm_params(shape) + V               # transform dense + norm + output bias
        nsp = 2 * h + 2
        rep += pooler + mlm + nsp
        bert_heads = mlm + nsp
    return {"tp": tp, "replicated": rep, "bert_pretraining": bert_heads}


def head_flops_per_token(shape: ModelShape) -> float:
    """Forward FLOPs per token of the output layer (logits 2 h V; BERT adds the MLM transform 2 h^2)."""
    h = shape.hidden_size
    extra = 2.0 * h * h if shape.arch == "bert" else 0.0
    return 2.0 * h * shape.vocab_size + extra


def param_counts(shape: ModelShape) -> ParamCounts:
    specs = layer_specs(shape)
    emb = embedding_params(shape)
    head = head_params(shape)
    layers = sum(s.params_tp + s.params_rep + s.params_expert for s in specs)
    experts = sum(s.params_expert for s in specs)
    active_layers = sum(s.params_tp + s.params_rep + s.params_active_expert for s in specs)
    embedding = emb["word"] + emb["replicated"]
    head_total = head["tp"] + head["replicated"]
    total = embedding + layers + head_total
    return ParamCounts(embedding=embedding, layers=layers, experts=experts, head=head_total,
                       bert_pretraining_heads=head["bert_pretraining"], total=total,
                       activated=embedding + active_layers + head_total)


def forward_flops_per_token(shape: ModelShape) -> dict:
    """{'layers', 'head', 'scores', 'total'}: forward matmul FLOPs per token (per position for enc-dec)."""
    specs = layer_specs(shape)
    layers = sum(s.fwd_flops for s in specs)
    head = head_flops_per_token(shape)
    return {"layers": layers, "head": head, "scores": sum(s.score_flops for s in specs), "total": layers + head}


def recompute_flops_per_token(shape: ModelShape, recompute: str) -> float:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute: '{recompute}' is not one of {list(RECOMPUTE)}")
    f = forward_flops_per_token(shape)
    return {"none": 0.0, "selective": f["scores"], "full": f["layers"]}[recompute]


def step_flops(shape: ModelShape, global_batch: int, recompute: str = "none") -> StepFlops:
    """FLOPs of one step of ``global_batch`` sequences of ``shape.seq_length`` tokens."""
    if global_batch <= 0:
        raise ValueError(f"global_batch: must be > 0, got {global_batch}")
    tokens = int(global_batch) * shape.seq_length
    fwd = forward_flops_per_token(shape)["total"] * tokens
    rec = recompute_flops_per_token(shape, recompute) * tokens
    model = 3.0 * fwd
    return StepFlops(tokens=tokens, forward=fwd, backward=2.0 * fwd, recompute=rec, model=model,
                     hardware=model + rec, approx_6nd=6.0 * param_counts(shape).activated * tokens)


def megatron_gpt_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021 eq. (3): FLOPs per iteration of GPT with full activation recomputation."""
    B, s, l, h, V = float(batch), float(seq), float(layers), float(hidden), float(vocab)
    return 96.0 * B * s * l * h * h * (1.0 + s / (6.0 * h) + V / (16.0 * l * h))
