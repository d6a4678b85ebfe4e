"""Benchmark shapes shared by the ms_llm worker and the Hugging Face peer worker (plain Python: both venvs import it).

Two presets. ``full`` is what the issue asks for: a BERT-base-shaped encoder at sequence 128 and a GPT-3 Small-shaped
decoder (Brown et al. 2020, table 2.1: 12 layers, d_model 768, 12 heads of 64, d_ff 3072) at sequence 512. ``quick``
keeps every width of those models (hidden 768, 12 heads, FFN 3072, full vocabularies, same sequence lengths, so the
matmul shapes per token are the same) and cuts only the depth and the batch, so the whole suite ends in about ten
minutes on 2 cores. Generation always makes 256 new tokens at batch 1 and 8; compile time is always 12 vs 48 layers
(the widths there are small on purpose: compilation cost depends on the graph, not on the tensor sizes).
"""
from __future__ import annotations

import copy

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                 max_position_embeddings=512, type_vocab_size=2, activation="gelu", norm_eps=1e-12, dropout=0.1,
                 num_labels=2)
GPT3_SMALL = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                  max_position_embeddings=2048, activation="gelu_new", norm_eps=1e-5, dropout=0.1)

PRESETS = {
    "full": {
        "train_bert": dict(model=BERT_BASE, batch=8, seq=128, warmup=2, rounds=3, per_round=2),
        "train_gpt": dict(model=GPT3_SMALL, batch=2, seq=512, warmup=2, rounds=3, per_round=2),
        "generate": dict(model=GPT3_SMALL, batches=(1, 8), prompt=32, new_tokens=256, warmup=1, rounds=3,
                         per_round=1),
        "compile": dict(model=dict(GPT3_SMALL, vocab_size=8192, max_position_embeddings=256, hidden_size=256,
                                   num_heads=4, ffn_hidden_size=1024),
                        depths=(12, 48), dropouts=(0.1, 0.0), batch=1, seq=128, steps=3),
        "matmul": dict(sizes=(1024, 2048, 4096), rounds=3, per_round=3),
        "moe": dict(args=[]),                   # bench_moe.py's own defaults (8 x 512 tokens, H 512, F 2048)
    },
    "quick": {
        "train_bert": dict(model=dict(BERT_BASE, num_layers=2), batch=4, seq=128, warmup=2, rounds=3, per_round=2),
        "train_gpt": dict(model=dict(GPT3_SMALL, num_layers=2), batch=1, seq=512, warmup=2, rounds=3,
                          per_round=2),
        "generate": dict(model=dict(GPT3_SMALL, num_layers=2), batches=(1, 8), prompt=32, new_tokens=256,
                         warmup=1, rounds=2, per_round=1),
        "compile": dict(model=dict(GPT3_SMALL, vocab_size=1024, max_position_embeddings=256, hidden_size=128,
                                   num_heads=4, ffn_hidden_size=512),
                        depths=(12, 48), dropouts=(0.1, 0.0), batch=1, seq=64, steps=3),
        "matmul": dict(sizes=(1024, 2048), rounds=3, per_round=3),
        "moe": dict(args=["--batch", "4", "--seq", "256", "--repeats", "5"]),   # half the tokens, same widths
    },
}


def preset(name: str) -> dict:
    """A deep copy of preset ``name`` ('quick' or 'full')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; valid: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
