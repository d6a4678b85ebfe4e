"""Text shipped with ms_llm for pre-training demos and tests (see README.md in this folder)."""
from __future__ import annotations

import os
from typing import List

CORPUS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = "persuasion_vol1.txt"


def default_corpus() -> str:
    """Path of the shipped corpus: Jane Austen, *Persuasion*, Volume I (public domain), one document per chapter."""
    return os.path.join(CORPUS_DIR, DEFAULT_CORPUS)


def read_documents(path: str) -> List[List[str]]:
    """Documents of a text file: blocks separated by empty lines; each document is its list of non-empty lines
    (paragraphs)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no corpus at {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs, cur = [], []
    for line in text.splitlines():
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            docs.append(cur)
            cur = []
    if cur:
        docs.append(cur)
    return docs
