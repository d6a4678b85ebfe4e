"""WordPiece tokenisation (BERT) with the ``tokenizers`` library: load a ``vocab.txt`` or train one from text.

:class:`WordPiece` wraps a ``tokenizers.Tokenizer`` built like BERT's uncased tokenizer (NFD + lower-casing +
accent stripping, whitespace/punctuation pre-tokenisation, ``##`` continuation pieces) and knows the special ids.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPiece:
    """A BERT WordPiece tokenizer: ``encode`` / ``encode_pair`` / ``batch`` give model-ready int arrays."""

    def __init__(self, tokenizer, lowercase: bool = True):
        self.tok = tokenizer
        self.lowercase = lowercase
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"WordPiece vocabulary lacks the special token(s) {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
        self.vocab_size = tokenizer.get_vocab_size()
        self.special_ids = frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab_path: str, lowercase: bool = True) -> "WordPiece":
        """Load a BERT ``vocab.txt`` (one token per line, id = line number)."""
        if not os.path.exists(vocab_path):
            raise FileNotFoundError(f"no WordPiece vocabulary at {vocab_path}")
        from tokenizers import Tokenizer
        from tokenizers.models import WordPiece as WordPieceModel
        vocab = {}
        with open(vocab_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise ValueError(f"{vocab_path}: token {token!r} appears twice (lines {vocab[token] + 1} and "
                                     f"{i + 1})")
                vocab[token] = i
        tok = Tokenizer(WordPieceModel(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(tok, lowercase)
        return cls(tok, lowercase)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 2) -> "WordPiece":
        """Train a WordPiece vocabulary of exactly ``vocab_size`` tokens (special tokens first: [PAD]=0, [UNK]=1,
        [CLS]=2, [SEP]=3, [MASK]=4). ValueError if the text is too small to reach that size."""
        from tokenizers import Tokenizer
        from tokenizers.models import WordPiece as WordPieceModel
        from tokenizers.trainers import WordPieceTrainer
        texts = list(texts)
        tok = Tokenizer(WordPieceModel(unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(tok, lowercase)
        # tokenizers <= 0.23 gives the '##c' continuation tokens ids in hash-map order, which changes merge
        # tie-breaking from run to run (huggingface/tokenizers#1794). Listing every '##c' up front, in sorted order,
        # fixes their ids and makes training deterministic.
        chars = set()
        for t in texts:
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t)):
                chars.update(word)
        fixed = list(SPECIAL_TOKENS) + ["##" + c for c in sorted(chars)]
        if len(fixed) >= vocab_size:
            raise ValueError(f"model.vocab_size={vocab_size} is too small: the text has {len(chars)} distinct "
                             f"characters (each needs a '##' continuation token)")
        trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=fixed,
                                   show_progress=False, continuing_subword_prefix="##")
        tok.train_from_iterator(texts, trainer=trainer)
        got = tok.get_vocab_size()
        if got != vocab_size:
            raise ValueError(f"model.vocab_size={vocab_size}: the WordPiece trainer reached only {got} tokens on this "
                             f"text; set model.vocab_size={got} (or ship a vocab.txt via data.tokenizer)")
        # rebuild from the vocabulary alone, so that the '##c' tokens are ordinary pieces, not added tokens
        clean = Tokenizer(WordPieceModel(tok.get_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(clean, lowercase)
        return cls(clean, lowercase)

    def save_vocab(self, path: str) -> None:
        """Write ``vocab.txt`` (token of id i on line i)."""
        vocab = self.tok.get_vocab()
        inv = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in inv] != list(range(len(inv))):
            raise ValueError("vocabulary ids are not contiguous")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for t, _ in inv:
                f.write(t + "\n")
        os.replace(tmp, path)

    # --- encoding -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        """Word-piece ids of ``text`` without special tokens."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def pieces(self, text: str) -> List[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(int(i))

    def is_continuation(self, i: int) -> bool:
        """True for '##' pieces (used by whole-word masking)."""
        t = self.tok.id_to_token(int(i))
        return t is not None and t.startswith("##")

    def encode_pair(self, a: Sequence[int], b: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
        """[CLS] a [SEP] (b [SEP]) ids and token-type ids."""
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def batch(self, texts: Sequence, max_length: int, pad_to: Optional[int] = None):
        """Encode texts (str, or (str, str) pairs) like ``BertTokenizerFast(..., truncation=True,
        padding='longest' or 'max_length')``: returns int64 ``input_ids``, ``token_type_ids``, ``attention_mask``
        of shape (N, L), L = the longest encoding (or ``pad_to``)."""
        rows = []
        for t in texts:
            if isinstance(t, (tuple, list)):
                a, b = self.tokenize(t[0]), self.tokenize(t[1])
                while len(a) + len(b) > max_length - 3:  # truncate the longer segment first (longest_first)
                    if len(a) >= len(b):
                        a = a[:-1]
                    else:
                        b = b[:-1]
                rows.append(self.encode_pair(a, b))
            else:
                rows.append(self.encode_pair(self.tokenize(t)[:max_length - 2]))
        width = pad_to if pad_to is not None else max(len(r[0]) for r in rows)
        if any(len(r[0]) > width for r in rows):
            raise ValueError(f"pad_to={width} is shorter than an encoding ({max(len(r[0]) for r in rows)} tokens)")
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        types = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, (r_ids, r_types) in enumerate(rows):
            ids[i, :len(r_ids)] = r_ids
            types[i, :len(r_types)] = r_types
            mask[i, :len(r_ids)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def _bert_pipeline(tok, lowercase: bool) -> None:
    """BERT's normaliser, pre-tokeniser and decoder on a tokenizers.Tokenizer (as BertWordPieceTokenizer sets)."""
    from tokenizers import decoders, normalizers, pre_tokenizers
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def load_tokenizer(path: str, lowercase: bool = True) -> WordPiece:
    """A WordPiece tokenizer from a ``vocab.txt`` file or a directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    return WordPiece.from_vocab(path, lowercase)
