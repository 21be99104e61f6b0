"""LongRoPE's factor search: the evolutionary search and its progressive chain."""
