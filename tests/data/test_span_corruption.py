"""T5 span corruption (``data.task: span_corruption``): the noise mask against a numpy transcription of T5's
``random_spans_noise_mask``, exact reconstruction of the window from inputs + targets, static widths, config errors,
and a short Switch pre-training run on the shipped corpus through the task builder and TrainStep."""
import dataclasses
import os
from math import comb

import numpy as np
import pytest

from ms_llm.config import load_config
from ms_llm.data.corpus import default_corpus
from ms_llm.data.seq2seq import BOS, EOS
from ms_llm.data.span_corruption import (SpanCorruptionData, build_span_corruption_task, corrupt,
                                         random_spans_noise_mask, span_corruption_lengths)


# ------------------------------------------------------------------------------------------------ reference
def t5_random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng):
    """Line-by-line numpy transcription of t5.data.preprocessors.random_spans_noise_mask (random_roll=False), with
    ``seqio.stateless_shuffle`` replaced by ``rng.permutation`` (noise segmentation drawn first)."""
    orig_length = length
    length = max(length, 2)
    num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(np.float32(num_noise_tokens) / np.float32(mean_noise_span_length)))
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        first_in_segment = np.pad(rng.permutation((np.arange(num_items - 1) < num_segments - 1).astype(np.int32)),
                                  [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        return np.bincount(segment_id)                        # tf.math.segment_sum(ones_like(segment_id), ...)

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(num_noise_spans * 2)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, np.int32)
    np.add.at(span_start_indicator, span_starts, 1)           # tf.math.unsorted_segment_sum
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:orig_length], num_noise_tokens, num_noise_spans


def t5_helper_lengths(tokens_length, noise_density, mean_noise_span_length):
    """t5.data.preprocessors.random_spans_helper's _tokens_length_to_inputs_length_targets_length (1 extra token per
    span on both sides)."""
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def runs(mask):
    """[(value, length), ...] of consecutive equal values."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return [(bool(s[0]), len(s)) for s in np.split(mask, edges)]


# ------------------------------------------------------------------------------------------------ (1) noise mask
@pytest.mark.parametrize("length,density,mean", [(64, 0.15, 3.0), (128, 0.15, 3.0), (568, 0.15, 3.0),
                                                 (10, 0.5, 1.0), (33, 0.3, 2.5), (7, 0.15, 3.0), (2, 0.15, 3.0)])
def test_noise_mask_matches_t5(length, density, mean):
    for seed in range(25):
        got = random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
        ref, num_noise, num_spans = t5_random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
        assert got.dtype == bool and got.shape == (length,)
        assert np.array_equal(got, ref), (seed, got.astype(int), ref.astype(int))
        assert int(got.sum()) == num_noise                                   # exact noise count
        r = runs(got)
        assert [v for v, _ in r] == [False, True] * num_spans                # alternate, non-noise first
        assert all(n >= 1 for _, n in r)
        again = random_spans_noise_mask(length, density, mean, np.random.default_rng(seed))
        assert np.array_equal(got, again)                                    # deterministic by seed
    # the seed matters whenever a segmentation has a choice (> 1 span, more tokens than spans on either side)
    masks = {random_spans_noise_mask(length, density, mean, np.random.default_rng(s)).tobytes() for s in range(25)}
    assert (len(masks) > 1) == (num_spans > 1 and (num_noise > num_spans or length - num_noise > num_spans))


def test_lengths_match_t5_helper_and_published_sizes():
    # T5's default: inputs_length 512 -> tokens_length 568, targets_length 114 (compute_input_and_target_lengths)
    n = span_corruption_lengths(568, 0.15, 3.0)
    assert (n.num_noise, n.num_spans, n.inputs_length, n.targets_length) == (85, 28, 512, 114)
    # T5's helper rounds in float64 without clipping, its mask in float32 with clipping: they agree from 10 tokens
    # on (>= 1 span) except where length * density is a half in float64 (190 * 0.15 = 28.5 -> 28, float32 -> 29);
    # ms_llm's widths come from the mask's own arithmetic, so they always fit the examples (tested below)
    differ = []
    for density, mean in [(0.15, 3.0), (0.3, 2.0), (0.5, 3.0)]:
        for length in range(10, 1000):
            n = span_corruption_lengths(length, density, mean)
            if (n.inputs_length, n.targets_length) != t5_helper_lengths(length, density, mean):
                assert abs(length * density % 1.0 - 0.5) < 1e-9, (length, density)
                differ.append((length, density))
    assert (190, 0.15) in differ and len(differ) < 60


def test_segmentation_is_uniform_over_compositions():
    """P(first noise span = l) for a uniform split of n tokens into k non-empty spans is C(n-l-1, k-2) / C(n-1, k-1);
    2000 masks of 64 tokens (n = 10, k = 3): every frequency within 0.04 (> 3.5 standard errors)."""
    n, k, draws = 10, 3, 2000
    first = []
    for seed in range(draws):
        mask = random_spans_noise_mask(64, 0.15, 3.0, np.random.default_rng([7, seed]))
        first.append(runs(mask)[1][1])
    freq = np.bincount(first, minlength=n - k + 2)[1:] / draws
    expected = np.array([comb(n - l - 1, k - 2) / comb(n - 1, k - 1) for l in range(1, n - k + 2)])
    assert np.abs(freq - expected).max() < 0.04, (freq, expected)


# ------------------------------------------------------------------------------------------------ (2) examples
def _data(seed=3, length=40, vocab=500, sentinels=20, train_tokens=2000, eval_tokens=150):
    rng = np.random.default_rng(0)
    train = rng.integers(3, vocab - sentinels, size=train_tokens).astype(np.int32)
    held = rng.integers(3, vocab - sentinels, size=eval_tokens).astype(np.int32)
    return SpanCorruptionData(train, held, length, 0.15, 3.0, vocab, sentinels, seed)


def reconstruct(inputs, targets, vocab, sentinels):
    """Replace every sentinel of the inputs by the tokens that follow it in the targets (both end with eos)."""
    spans, cur = {}, None
    for tok in targets[:-1]:
        if tok >= vocab - sentinels:
            cur = int(tok)
            spans[cur] = []
        else:
            spans[cur].append(int(tok))
    out = []
    for tok in inputs[:-1]:
        out.extend(spans.pop(int(tok)) if tok >= vocab - sentinels else [int(tok)])
    assert not spans                                                          # every span used once
    return out


def test_inputs_and_targets_reconstruct_the_window():
    vocab, sentinels = 500, 20
    data = _data(vocab=vocab, sentinels=sentinels)
    n = data.lengths
    assert (n.num_noise, n.num_spans, n.inputs_length, n.targets_length) == (6, 2, 37, 9)
    for i in range(60):
        window, mask = data.train_example(i)
        inputs, targets, is_span = corrupt(window, mask, vocab)
        assert (len(inputs), len(targets)) == (n.inputs_length, n.targets_length)
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert reconstruct(inputs, targets, vocab, sentinels) == window.tolist()
        expected_sentinels = [vocab - 1 - k for k in range(n.num_spans)]       # <extra_id_0> = vocab - 1, down
        assert [t for t in inputs if t >= vocab - sentinels] == expected_sentinels
        assert [t for t in targets if t >= vocab - sentinels] == expected_sentinels
        assert targets[0] == vocab - 1
        assert np.array_equal(targets[is_span], window[mask])                 # span flags = the hidden tokens


def test_batches_static_deterministic_and_shifted():
    data = _data()
    n = data.lengths
    src, src_mask, tgt_in, tgt_mask, labels, label_mask = data.batch(5, 4)
    assert src.shape == src_mask.shape == (4, n.inputs_length)                # (B, Ls)
    assert tgt_in.shape == labels.shape == tgt_mask.shape == label_mask.shape == (4, n.targets_length)
    assert src.dtype == labels.dtype == tgt_in.dtype == np.int32 and src_mask.dtype == np.float32
    assert src_mask.all() and label_mask.all()                                # full windows: no padding
    assert np.all(tgt_in[:, 0] == BOS) and np.array_equal(tgt_in[:, 1:], labels[:, :-1])
    again = _data()
    it = again.batches(5, 4)
    assert all(np.array_equal(a, b) for a, b in zip(next(it), (src, src_mask, tgt_in, tgt_mask, labels, label_mask)))
    assert all(np.array_equal(a, b) for a, b in zip(next(it), data.batch(6, 4)))                  # exact resume
    assert not np.array_equal(_data(seed=4).batch(5, 4)[0], src)
    # example i is the same whatever the batch size (row r of step s = example s * B + r)
    assert np.array_equal(data.batch(10, 2)[4], labels[:2])
    # held-out: 150 tokens -> 3 windows of 40; batches of 2 -> the filler row has zero label / span masks
    ev = data.eval_batches(2)
    assert len(ev) == 2 and ev[1][0].shape == (2, n.inputs_length)
    assert ev[1][5][1].sum() == 0 and not ev[1][6][1].any() and ev[1][5][0].sum() == n.targets_length


# ------------------------------------------------------------------------------------------------ (3) config errors
@pytest.mark.parametrize("overrides,key", [
    (["data.noise_density=0.0"], "data.noise_density"),
    (["data.noise_density=1.2"], "data.noise_density"),
    (["data.mean_noise_span_length=0.5"], "data.mean_noise_span_length"),
    (["data.num_sentinels=0"], "data.num_sentinels"),
    (["data.seq_length=64", "data.num_sentinels=2"], "data.num_sentinels"),          # 3 spans need 3 sentinels
    (["data.seq_length=10", "data.noise_density=0.9", "data.mean_noise_span_length=1.0"], "data.noise_density"),
    (["data.seq_length=1"], "data.seq_length"),
    (["model.arch=gpt"], "data.task"),
    (["model.vocab_size=300", "data.num_sentinels=100"], "model.vocab_size"),
    (["model.arch=transformer", "model.position_embedding=learned", "model.max_position_embeddings=32",
      "data.seq_length=40"], "data.seq_length"),                                      # inputs of 37 > 32
])
def test_bad_config_names_the_key(overrides, key):
    base = ["model.arch=switch", "model.position_embedding=relative", "model.moe.num_experts=4",
            "model.vocab_size=1100", "data.task=span_corruption"]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, base + overrides)
    load_config(None, base)                                                  # the base itself is valid


# ------------------------------------------------------------------------------------------------ (4) training
def _cfg(tmp_path, corpus, **data):
    model = dict(arch="switch", vocab_size=316, hidden_size=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                 ffn_hidden_size=64, activation="relu", norm="rmsnorm", pre_norm=True, position_embedding="relative",
                 use_bias=False, tie_word_embeddings=True, dropout=0.0,
                 moe=dict(num_experts=4, top_k=1, router="topk", moe_every=2, moe_offset=1))
    base = {"model": model,
            "train": {"batch_size": 8, "steps": 30, "seed": 5, "lr": 1e-2, "weight_decay": 0.0,
                      "output_dir": str(tmp_path / "run")},
            "data": {"task": "span_corruption", "seq_length": 32, "num_sentinels": 16, "corpus": corpus,
                     **data}}
    return load_config(None, base=base)


def test_tokenizer_and_model_ids_must_agree(tmp_path, small_corpus):
    cfg = _cfg(tmp_path, small_corpus)
    with pytest.raises(ValueError, match=r"model\.pad_token_id"):
        build_span_corruption_task(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, eos_token_id=5)))
    gpt2 = os.path.join(os.path.dirname(default_corpus()), os.pardir, "assets", "gpt2")
    with pytest.raises(ValueError, match=r"model\.vocab_size.*data\.num_sentinels"):
        build_span_corruption_task(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=gpt2)))


def test_switch_pretrains_on_the_corpus(tmp_path, small_corpus):
    from mindspore import Tensor
    from ms_llm.training.step import TrainStep
    from ms_llm.training.tasks import build_task

    cfg = _cfg(tmp_path, small_corpus)
    task = build_task(cfg)
    assert os.path.exists(tmp_path / "run" / "tokenizer" / "merges.txt")
    assert task.tokens_per_batch == 8 * 32 and task.flops_per_token > 0
    before = task.evaluate(task.model)
    assert before["perplexity"] == pytest.approx(np.exp(before["loss"]), rel=1e-6)
    assert abs(before["loss"] - np.log(316)) < 1.0                          # a fresh model is near uniform
    task.model.set_train(True)
    step = TrainStep(task.loss_net, task.model.trainable_params(), cfg.train, dynamic_scale=False)
    losses, stats = [], None
    for i, batch in zip(range(cfg.train.steps), task.batches(0)):
        lr = cfg.train.lr * min(1.0, (i + 1) / 5)
        loss, finite, _, _ = step.step([batch], lr)
        assert finite
        losses.append(loss)
        if i == 0:
            stats = task.log_metrics(task.model, batch)
    # targets are 8 tokens (2 sentinels, 5 span tokens, eos); sentinels, eos and frequent words are learned fast
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    loads = [v for k, v in stats.items() if "/load_e" in k]
    assert len(loads) == 2 * 4 and "moe/dropped" in stats                    # 1 sparse layer per stack, 4 experts
    assert np.sum(loads) == pytest.approx(2.0, abs=1e-4)                      # each layer's histogram sums to 1
    after = task.evaluate(task.model)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert 0.0 <= after["span_accuracy"] <= 1.0
    text = task.sample(task.model)
    assert "<extra_id_0>" in text and "greedy:" in text, text
