"""Recipes for wav2vec 2.0 with the paper's vector quantizers."""
