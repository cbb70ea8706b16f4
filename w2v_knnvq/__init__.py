"""KNN-regularized smoothed vector quantization for wav2vec 2.0 pretraining with fairseq2."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one place the version is written is `pyproject.toml`.
    __version__ = version("w2v-knnvq")
except PackageNotFoundError:
    __version__ = "unknown (not installed)"
