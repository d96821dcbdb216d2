"""Data pipeline: shards, tokenizers, packing, streaming, preparation, fine-tuning records."""
