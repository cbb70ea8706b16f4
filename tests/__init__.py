"""The test suite of w2v-knnvq."""
