"""Generation with a static KV cache: incremental logits equal full-forward logits (gpt3, GPT-3 banded, GQA + RoPE),
left padding, stop tokens, Hugging Face's sampling processors, one compiled decode graph per (batch, cache length),
caches outside the model's parameters and checkpoints, argument errors."""
import dataclasses

import numpy as np
import pytest
from mindspore import Tensor

from ms_llm.config import ModelConfig
from ms_llm import generation
from ms_llm.generation import ProgressStreamer, process_scores, sample_tokens, top_k_filter, top_p_filter
from ms_llm.models.gpt import GPTLMHeadModel

BASE = ModelConfig(arch="gpt", vocab_size=53, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=32,
                   max_position_embeddings=32, dropout=0.0, initializer_range=0.5, pad_token_id=0, eos_token_id=2)
VARIANTS = {
    # GPT-3: learned positions, dense layers 0 and 2, banded layer 1 (band 3 << sequence length 16)
    "gpt3": {"num_layers": 3, "attention_pattern": "alternating_banded", "band_width": 3},
    # Llama: rotary positions, grouped-query attention (4 query / 2 kv heads), SwiGLU, RMSNorm, untied head
    "llama": {"num_heads": 4, "num_kv_heads": 2, "position_embedding": "rotary", "norm": "rmsnorm",
              "activation": "swiglu", "use_bias": False, "tie_word_embeddings": False},
}
# the same with the fused attention core: heads as (B, S, nh, hd) around the core, the prefilled cache transposed
VARIANTS["llama_fused"] = dict(VARIANTS["llama"], attention_impl="fused")
P, NEW = 6, 10


def _model(name, seed=0):
    cfg = dataclasses.replace(BASE, **VARIANTS[name])
    model = GPTLMHeadModel(cfg)
    model.init_weights(seed)
    model.set_train(False)
    return model


def _prompts():
    rng = np.random.default_rng(5)
    ids = rng.integers(3, BASE.vocab_size, (2, P))
    mask = np.ones((2, P), np.int64)
    ids[1, :2], mask[1, :2] = 0, 0                      # row 1: left-padded prompt of 4 tokens
    return ids, mask


def _full_forward(model, seq, mask):
    pos = np.where(mask == 1, np.cumsum(mask, 1) - 1, 0)
    return model(Tensor(seq.astype(np.int32)), Tensor(mask.astype(np.float32)),
                 Tensor(pos.astype(np.int32))).logits.asnumpy()


@pytest.fixture(scope="module")
def gpt3():
    model = _model("gpt3")
    ids, mask = _prompts()
    out = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=None,
                         return_dict_in_generate=True, output_logits=True)
    return model, ids, mask, out


@pytest.mark.parametrize("name", ["gpt3", "llama", "llama_fused"])
def test_incremental_logits_equal_full_forward(name, gpt3):
    if name == "gpt3":
        model, ids, mask, out = gpt3
    else:   # the prompt through a full-forward prefill graph (the GPT-3 model steps it through the decode graph)
        model = _model(name)
        ids, mask = _prompts()
        out = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True, prefill="forward")
    seq = out.sequences
    assert seq.shape == (2, P + NEW) and np.array_equal(seq[:, :P], ids)
    full_mask = np.concatenate([mask, np.ones((2, NEW), np.int64)], 1)
    full = _full_forward(model, seq, full_mask)                               # (B, P + NEW, V)
    assert len(out.logits) == NEW
    for t, step_logits in enumerate(out.logits):
        # logits of new token t come from position P - 1 + t of the full sequence. fp32 with logits up to ~6.4
        # (initializer_range 0.5): up to 1.5e-5 observed through the model's blocks, 2.1e-5 through the fused
        # decode layer (the default on CPU for gpt3), i.e. ~3e-6 of the logit scale; a wrong mask or slot is O(0.1)
        np.testing.assert_allclose(step_logits, full[:, P - 1 + t], atol=5e-5, rtol=0)
        assert np.array_equal(seq[:, P + t], step_logits.argmax(-1))          # greedy
    cells = model._ms_llm_generation_steps[(2, 64)]                           # (batch, cache length 64)
    (prefill,), (step,) = cells.prefill.values(), cells.decode.values()
    assert len(step.compile_cache) == 1                                       # the decode step compiled once
    assert len(prefill.compile_cache) == (0 if name == "gpt3" else 1)


def test_caches_compile_once_per_shape_and_stay_out_of_parameters_and_checkpoints(tmp_path, monkeypatch):
    import mindspore as ms
    model = _model("gpt3", seed=1)
    names = [n for n, _ in model.parameters_and_names()]
    trainable = [p.name for p in model.trainable_params()]
    ids, mask = _prompts()
    kw = dict(max_new_tokens=NEW, eos_token_id=None)
    first = model.generate(ids, attention_mask=mask, **kw)
    model.generate(ids[:, ::-1].copy(), **kw)                                 # other prompts, same (B, L) = (2, 64)
    again = model.generate(ids, attention_mask=mask, **kw)
    assert np.array_equal(again, first)                                       # nothing stale leaks between calls
    single = model.generate(ids[:1], attention_mask=mask[:1], cache_multiple=32, **kw)
    assert np.array_equal(single, first[:1])                                  # (B, L) = (1, 32): its own caches
    table = model._ms_llm_generation_steps
    assert sorted(table) == [(1, 32), (2, 64)]
    for (b, length), cells in table.items():
        (prefill,), (step,) = cells.prefill.values(), cells.decode.values()
        assert len(step.compile_cache) == 1 and len(prefill.compile_cache) == 0
        caches = list(step.k_caches) + list(step.v_caches)
        assert len(caches) == 2 * model.cfg.num_layers and not any(c.requires_grad for c in caches)
        assert all(c.shape == (b, model.cfg.kv_heads, length, model.cfg.dim_per_head) for c in caches)
        assert all(c is d for c, d in zip(caches, list(prefill.k_caches) + list(prefill.v_caches)))
        assert np.abs(caches[0].asnumpy()[:, :, P + NEW - 2]).max() > 0       # the last fed token was written in place
    assert [n for n, _ in model.parameters_and_names()] == names
    assert [p.name for p in model.trainable_params()] == trainable
    assert not any("cache" in n for n in names)
    ms.save_checkpoint(model, str(tmp_path / "m.ckpt"))
    assert sorted(ms.load_checkpoint(str(tmp_path / "m.ckpt"))) == sorted(names)
    # the prompt through the prefill graph writes the same caches as stepping it through the decode graph
    stepped = [c.asnumpy()[:, :, :P] for c in table[(2, 64)].cache.keys]
    model.generate(ids, attention_mask=mask, prefill="forward", **kw)
    written = [c.asnumpy()[:, :, :P] for c in table[(2, 64)].cache.keys]
    for a, b in zip(stepped, written):
        np.testing.assert_allclose(a * mask[:, None, :, None], b * mask[:, None, :, None], atol=1e-5, rtol=0)
    (prefill,), (step,) = table[(2, 64)].prefill.values(), table[(2, 64)].decode.values()
    assert len(prefill.compile_cache) == 1 and len(step.compile_cache) == 1
    # at most MAX_CACHED_SHAPES (batch, cache length) entries are kept, the least recently used dropped first
    monkeypatch.setattr(generation, "MAX_CACHED_SHAPES", 2)
    model.generate(ids[:1], max_new_tokens=NEW, eos_token_id=None)            # (1, 64)
    assert list(table) == [(2, 64), (1, 64)]                                  # (1, 32) was the oldest


def test_left_padded_prompt_equals_unpadded(gpt3):
    model, ids, mask, out = gpt3
    full_mask = np.concatenate([mask, np.ones((2, NEW), np.int64)], 1)
    padded = _full_forward(model, out.sequences, full_mask)[1, 2:]           # row 1 without its 2 pads
    alone = _full_forward(model, out.sequences[1:, 2:], full_mask[1:, 2:])[0]
    np.testing.assert_allclose(padded, alone, atol=2e-5, rtol=0)


def test_stop_tokens_pad_finished_rows_and_end_early(gpt3):
    model, ids, mask, out = gpt3
    new = out.sequences[:, P:]
    stop = int(new[0, 2])
    assert stop not in new[1]
    got = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=stop, pad_token_id=1)
    first = int(np.argmax(new[0] == stop))                                    # row 0 stops at its first `stop`
    assert np.array_equal(got[0, P:P + first + 1], new[0, :first + 1])
    assert np.all(got[0, P + first + 1:] == 1)                                # then padding
    assert np.array_equal(got[1], out.sequences[1])                           # row 1 unaffected
    # a list of stop ids: generation ends as soon as every row has stopped
    both = [int(new[0, 1]), int(new[1, 0])]
    ends = [int(np.argmax(np.isin(row, both))) for row in new]                # each row's first stop
    got = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=both)
    assert got.shape == (2, P + max(ends) + 1)
    # min_new_tokens suppresses the stop ids for the first steps
    got = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=[int(new[0, 0])],
                         min_new_tokens=3)
    assert int(new[0, 0]) not in got[0, P:P + 3]


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt3):
    model, ids, mask, out = gpt3
    kw = dict(max_new_tokens=NEW, attention_mask=mask, eos_token_id=None, do_sample=True)
    a = model.generate(ids, seed=3, temperature=1.5, **kw)
    b = model.generate(ids, seed=3, temperature=1.5, **kw)
    assert np.array_equal(a, b)
    assert np.array_equal(model.generate(ids, seed=4, top_k=1, **kw), out.sequences)
    assert np.array_equal(model.generate(ids, seed=4, top_k=0, top_p=1e-6, **kw), out.sequences)


def test_processors_follow_hugging_face():
    scores = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32))
    inf = -np.inf
    # TopK keeps the k largest (ties with the k-th kept)
    assert np.array_equal(top_k_filter(scores, 2)[0] == inf, [True, True, False, False])
    assert np.array_equal(top_k_filter(np.array([[1.0, 3.0, 3.0, 2.0]]), 1)[0] == inf, [True, False, False, True])
    # TopP drops tokens whose ascending cumulative probability is <= 1 - top_p: 0.5 keeps {0.3, 0.4} ...
    assert np.array_equal(top_p_filter(scores, 0.5)[0] == inf, [True, True, False, False])
    assert np.array_equal(top_p_filter(scores, 0.5)[1] == inf, [False, False, True, True])
    # ... 0.35 keeps only 0.4, and at least one token always survives
    assert np.array_equal(top_p_filter(scores, 0.35)[0] == inf, [True, True, True, False])
    assert np.isfinite(top_p_filter(scores, 1e-9)).sum() == 2
    # temperature divides the logits before the filters; suppressed ids are -inf even when greedy
    got = process_scores(scores, None, True, 2.0, 0, 1.0)
    np.testing.assert_allclose(got, scores / 2.0)
    assert process_scores(scores, np.array([3]), False, 1.0, 50, 1.0)[0, 3] == inf


def test_sampler_frequencies():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = np.tile(np.log(np.maximum(probs, 1e-300)), (20000, 1))
    scores[:, 4] = -np.inf
    draws = sample_tokens(scores, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015)                       # ~4 standard errors at n = 20000


def test_progress_streamer_counts_tokens(gpt3):
    model, ids, mask, out = gpt3
    streamer = ProgressStreamer(total=NEW, disable=True)
    got = model.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=None, streamer=streamer)
    assert np.array_equal(got, out.sequences)
    assert np.array_equal(streamer.prompt, ids) and len(streamer.new_tokens) == NEW
    assert streamer.tokens_per_second > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 40}, "max_position_embeddings"),
    ({"attention_mask": np.ones((2, 3))}, "attention_mask shape"),
    ({"attention_mask": np.array([[1] * P, [0] * P])}, "at least one real token"),
    ({"input_ids": np.full((1, 3), 99)}, "input_ids must be in"),
    ({"input_ids": np.zeros((1, 0), np.int64)}, "length >= 1"),
    ({"prefill": "chunked"}, "prefill must be"),
])
def test_bad_arguments(gpt3, kwargs, match):
    model, ids, _, _ = gpt3
    args = dict(input_ids=ids, max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(**args)


def test_right_padding_warns(gpt3):
    model, ids, _, _ = gpt3
    mask = np.ones((2, P), np.int64)
    mask[0, -1] = 0
    with pytest.warns(UserWarning, match="left padding"):
        model.generate(ids, max_new_tokens=1, attention_mask=mask)


# ------------------------------------------------------------------------------------------------ ms-llm generate
def test_generate_cli_on_a_training_run(tmp_path, monkeypatch):
    from ms_llm.config import RunConfig, dump_config
    from ms_llm.data.bpe import BPETokenizer
    from ms_llm.generation import generate_cli
    from ms_llm.models import MODELS
    from ms_llm.training import checkpointing
    monkeypatch.setitem(MODELS, "gpt", ("ms_llm.models.gpt", "GPTLMHeadModel"))
    tok = BPETokenizer.train(["the cat sat on the mat, the dog sat on the log."] * 20, 270)
    cfg = RunConfig(model=dataclasses.replace(BASE, vocab_size=270, max_position_embeddings=64))
    model = GPTLMHeadModel(cfg.model)
    model.init_weights(1)
    run = tmp_path / "run"
    checkpointing.save(str(run), 10, model, [], cfg)
    dump_config(cfg, str(run / "config.yaml"))
    tok.save(str(run / "tokenizer"))
    lines = []
    stats = generate_cli(str(run), "the cat", max_new_tokens=12, progress=False, print_fn=lines.append)
    prompt = tok.encode("the cat")
    expected = model.generate(np.array([prompt]), max_new_tokens=12)
    assert stats["text"] == tok.decode(expected[0]) and lines[0] == stats["text"]
    assert stats["text"].startswith("the cat") and "tokens/s" in lines[1]
    assert stats["new_tokens"] == expected.shape[1] - len(prompt) == 12 and stats["tokens_per_s"] > 0


def test_load_causal_lm_finds_models_and_tokenizers(tmp_path):
    import os
    from ms_llm.data.bpe import BPETokenizer
    from ms_llm.generation import load_causal_lm
    hf = os.path.join(os.path.dirname(__file__), "references", "data", "gpt2_tiny")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_causal_lm(hf)
    BPETokenizer.train(["some text to learn from"] * 5, 280).save(str(tmp_path / "tok"))
    model, tok = load_causal_lm(hf, tokenizer=str(tmp_path / "tok"))
    assert model.cfg.vocab_size == 300 and 259 <= tok.vocab_size <= 280 and not model.training
    with pytest.raises(FileNotFoundError, match="neither"):
        load_causal_lm(str(tmp_path))
