"""Models: the decoder-only transformer, scalar heads, Hugging Face import/export."""
