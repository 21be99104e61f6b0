"""Training under a factor set: fine-tuning, the whole LongRoPE road (extend) and its report."""
