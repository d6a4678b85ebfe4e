"""Byte-level BPE (GPT-2 / GPT-3 style) on top of Hugging Face ``tokenizers``.

Two ways to get one:

* :meth:`BPETokenizer.train` learns merges from text (the causal-LM task trains on the shipped corpus), with the
  special tokens ``<|pad|>`` = 0, ``<|bos|>`` = 1 and ``<|endoftext|>`` = 2, matching ``ModelConfig``'s default
  ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id``.
* :meth:`BPETokenizer.from_files` / :meth:`BPETokenizer.load` read Hugging Face's ``vocab.json`` + ``merges.txt``
  (OpenAI's ``encoder.json`` + ``vocab.bpe``) or any ``tokenizer.json`` (e.g. Llama's, whose ``</s>`` is taken as
  end-of-text). ``<|endoftext|>`` is registered as a special token when it is in the vocabulary, so
  ``"a<|endoftext|>b"`` encodes like ``GPT2TokenizerFast``.

Pre-tokenisation is GPT-2's (``add_prefix_space=False``), so the GPT-2 files reproduce OpenAI's ids.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

EOS_TOKEN = "<|endoftext|>"
TRAINED_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", EOS_TOKEN)   # ids 0, 1, 2 of a trained tokenizer
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")   # end-of-text of other tokenizer.json files
GPT2_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2")


class BPETokenizer:
    """Thin wrapper of a ``tokenizers.Tokenizer`` with byte-level pre-tokeniser and decoder."""

    def __init__(self, tokenizer, eos_token: str = EOS_TOKEN, pad_token: Optional[str] = None,
                 bos_token: Optional[str] = None):
        self.tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if eos_token not in vocab:
            raise ValueError(f"end-of-text token {eos_token!r} is not in the vocabulary")
        self.eos_token = eos_token
        self.eos_id = vocab[eos_token]
        # GPT-2 has one special token that also serves as bos and pad (as Hugging Face's generate does).
        self.pad_id = vocab[pad_token] if pad_token in vocab else self.eos_id
        self.bos_id = vocab[bos_token] if bos_token in vocab else self.eos_id

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        """Learn a byte-level BPE of at most ``vocab_size`` tokens (special tokens included) from ``texts``."""
        from tokenizers import ByteLevelBPETokenizer
        if vocab_size < 256 + len(TRAINED_SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols + "
                             f"{len(TRAINED_SPECIAL_TOKENS)} special tokens of a byte-level BPE")
        bpe = ByteLevelBPETokenizer(add_prefix_space=False)
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(TRAINED_SPECIAL_TOKENS), show_progress=False)
        return cls(bpe._tokenizer, EOS_TOKEN, pad_token="<|pad|>", bos_token="<|bos|>")

    @classmethod
    def from_files(cls, vocab_json: str, merges_txt: str) -> "BPETokenizer":
        """Hugging Face ``vocab.json`` + ``merges.txt`` (GPT-2 layout)."""
        from tokenizers import ByteLevelBPETokenizer
        for p in (vocab_json, merges_txt):
            if not os.path.exists(p):
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        bpe = ByteLevelBPETokenizer(vocab_json, merges_txt, add_prefix_space=False)
        vocab = bpe.get_vocab()
        specials = [t for t in TRAINED_SPECIAL_TOKENS if t in vocab]
        if EOS_TOKEN not in vocab:
            raise ValueError(f"{vocab_json}: no {EOS_TOKEN!r} token")
        bpe.add_special_tokens(specials)
        return cls(bpe._tokenizer, EOS_TOKEN, pad_token="<|pad|>", bos_token="<|bos|>")

    @classmethod
    def gpt2(cls) -> "BPETokenizer":
        """OpenAI's GPT-2 tokenizer (50257 tokens) shipped in ``ms_llm/data/assets/gpt2``."""
        return cls.from_files(os.path.join(GPT2_ASSETS, "vocab.json"), os.path.join(GPT2_ASSETS, "merges.txt"))

    @classmethod
    def load(cls, path: str) -> "BPETokenizer":
        """A folder with ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``), or a ``tokenizer.json`` file."""
        from tokenizers import Tokenizer
        if os.path.isdir(path):
            vj, mt, tj = (os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json"))
            if os.path.exists(vj) and os.path.exists(mt):
                return cls.from_files(vj, mt)
            if os.path.exists(tj):
                path = tj
            else:
                raise FileNotFoundError(f"{path}: needs vocab.json + merges.txt or tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        if not path.endswith(".json"):
            raise ValueError(f"{path}: a byte-level BPE is a tokenizer.json or a folder with vocab.json + merges.txt")
        tok = Tokenizer.from_file(path)
        vocab = tok.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise ValueError(f"{path}: no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
        return cls(tok, eos, pad_token="<|pad|>", bos_token="<|bos|>")

    def save(self, directory: str) -> None:
        """Write ``vocab.json`` + ``merges.txt`` (Hugging Face GPT-2 layout) and ``tokenizer.json``."""
        os.makedirs(directory, exist_ok=True)
        self.tok.model.save(directory)               # vocab.json, merges.txt
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump({"eos_token": self.eos_token, "pad_id": self.pad_id, "bos_id": self.bos_id}, f)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
