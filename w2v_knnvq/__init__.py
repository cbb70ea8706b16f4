"""KNN-regularized smoothed vector quantization for wav2vec 2.0 pretraining with fairseq2."""
