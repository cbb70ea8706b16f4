"""fairseq2 recipes of w2v-knnvq."""
