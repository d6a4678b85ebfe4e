"""Data: tokenizers and training pipelines (seq2seq, causal LM, BERT MLM+NSP, fine-tuning)."""
