"""Fixtures shared by the data tests."""
import pytest

from ms_llm.data.corpus import default_corpus, read_documents


@pytest.fixture
def small_corpus(tmp_path):
    """Chapters 1-2 of the shipped corpus for training, the start of chapter 12 held out (a small, fast corpus)."""
    docs = read_documents(default_corpus())
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join("\n".join(d) for d in (docs[0], docs[1], docs[11][:6])) + "\n")
    return str(path)
