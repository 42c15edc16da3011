"""Evaluation: text featurizers, MAUVE, generative perplexity, held-out likelihood."""
