"""Recipes that rebuild the bundled model's data: the public-domain corpus and its BPE tokenizer."""
