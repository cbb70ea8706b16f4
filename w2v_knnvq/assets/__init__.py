"""fairseq2 asset cards of w2v-knnvq (YAML files in this package)."""
