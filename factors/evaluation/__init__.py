"""Measuring a model under a factor set: perplexity and retrieval, the texts they read, plots."""
