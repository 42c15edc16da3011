"""Corpora, tokenizers and tokenized memmap shards."""
