"""Loads a pretrained ``wav2vec2_knnvq`` model, or one of fairseq2's ``wav2vec2`` family,
from an asset card, a pretraining output directory or a checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch.nn import Module

from fairseq2.assets import AssetCard, AssetCardError, AssetNotFoundError, AssetStore
from fairseq2.device import CPU, Device
from fairseq2.error import InternalError
from fairseq2.models import ModelFamily, load_model
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY, Wav2Vec2Config, Wav2Vec2Model
from fairseq2.runtime.dependency import get_dependency_resolver
from fairseq2.utils.validation import ValidationError

from w2v_knnvq.runs import (
    RunCheckpointError,
    check_card_checkpoint,
    find_run_checkpoint,
    load_run_model_of_families,
    restricted_card,
)
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY, Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel
from w2v_knnvq.wav2vec2.frames import PretrainingModel as PretrainingModel

PretrainingConfig = Wav2Vec2KnnVqConfig | Wav2Vec2Config
"""The configuration of a :data:`PretrainingModel`."""

FEATURE_FAMILIES: Final = (WAV2VEC2_KNNVQ_FAMILY, WAV2VEC2_FAMILY)
"""The model families that feature extraction loads."""


class PretrainedModelError(RunCheckpointError):
    """A model source that cannot be loaded; the message names the file and the fix."""


@dataclass(kw_only=True)
class PretrainedModel:
    model: PretrainingModel
    """In eval mode."""

    config: PretrainingConfig

    source: str
    """The asset name or checkpoint path it was loaded from."""

    normalize_audio: bool = False
    """Whether pretraining standardized each waveform (zero mean, unit variance);
    feature extraction must then do the same."""


def load_pretrained_model(
    source: str | Path,
    *,
    step: int | None = None,
    device: Device = CPU,
    dtype: torch.dtype = torch.float32,
) -> PretrainedModel:
    """Loads a pretrained ``wav2vec2_knnvq`` or ``wav2vec2`` model in eval mode.

    :param source: One of

        - an asset card name whose card has a ``checkpoint``, e.g. fairseq2's ``wav2vec2_base``;
        - a pretraining output directory (holding ``config.yaml`` and ``checkpoints/``);
        - a run's ``checkpoints`` directory or one of its ``step_N`` directories;
        - a checkpoint file (``sdp_00.pt``) inside such a run.

    :param step: The training step to load; with an output or ``checkpoints``
        directory the last one if ``None``.

    :raises PretrainedModelError: if nothing loadable is found, the model belongs to
        another family than :data:`FEATURE_FAMILIES`, or the weights do not fit the run's
        configuration.
    """
    # Initializes fairseq2 (and with it this project's extension) on first use.
    get_dependency_resolver()

    path = Path(source)

    if path.exists():
        return _load_from_path(path, step, device, dtype)

    if step is not None:
        raise PretrainedModelError(
            f"{source}: `step` only applies to a pretraining output directory, and no such path exists."
        )

    return _load_from_card(str(source), device, dtype)


def _load_from_card(name: str, device: Device, dtype: torch.dtype) -> PretrainedModel:
    resolver = get_dependency_resolver()

    try:
        card = restricted_card(resolver.resolve(AssetStore).retrieve_card(name))
    except AssetNotFoundError:
        raise PretrainedModelError(
            f"{name}: neither an existing path nor a known asset card; pass a pretraining output directory, "
            "a checkpoint file, or a card name from `python -m fairseq2.assets list --kind model`."
        ) from None

    family = card.field("model_family").as_(str)

    _check_family(family, name)

    if card.maybe_get_field("checkpoint") is None:
        raise PretrainedModelError(
            f"{name}: the asset card describes an architecture but has no `checkpoint`; "
            "write a card with `base: " + name + "` and a `checkpoint` path, or pass a checkpoint directly."
        )

    config = _config_from_card(card)

    try:
        # fairseq2's `load_model` takes the family from the card.
        model = load_model(card, device=device, dtype=dtype, config=config)
    except AssetCardError:
        # A file that the weights-only unpickler refused: name the global it refers to.
        try:
            check_card_checkpoint(card)
        except RunCheckpointError as ex:
            raise PretrainedModelError(str(ex)) from None

        raise

    return _ready(model, config, card.name, normalize_audio=False)


def _load_from_path(path: Path, step: int | None, device: Device, dtype: torch.dtype) -> PretrainedModel:
    try:
        run = find_run_checkpoint(path, checkpoint=step)

        _check_family(run.family, str(run.metadata_file))

        model = load_run_model_of_families(run, FEATURE_FAMILIES, device=device, dtype=dtype)

        config = _config_from_card(run.card)
    except PretrainedModelError:
        raise
    except RunCheckpointError as ex:
        raise PretrainedModelError(str(ex)) from ex

    return _ready(model, config, str(run.model_dir), normalize_audio=bool(run.normalize_audio))


def _check_family(family: str, source: str) -> None:
    if family not in FEATURE_FAMILIES:
        raise PretrainedModelError(
            f"{source}: holds a `{family}` model, but feature extraction loads `{WAV2VEC2_KNNVQ_FAMILY}` and "
            f"`{WAV2VEC2_FAMILY}` pretraining models; use fairseq2's own tools for `{family}` checkpoints."
        )


def _config_from_card(card: AssetCard) -> PretrainingConfig:
    """The configuration of the card's model, read by its family (one of :data:`FEATURE_FAMILIES`)."""
    family = get_dependency_resolver().resolve(ModelFamily, key=card.field("model_family").as_(str))

    try:
        config = family.get_model_config(card)
    except (AssetCardError, ValidationError, ValueError) as ex:
        raise PretrainedModelError(f"{card.name}: the model configuration cannot be read ({ex}).") from ex

    if not isinstance(config, (Wav2Vec2KnnVqConfig, Wav2Vec2Config)):
        raise InternalError(f"The `{family.name}` family gives a `{type(config).__name__}` configuration.")

    return config


def _ready(model: Module, config: PretrainingConfig, source: str, *, normalize_audio: bool) -> PretrainedModel:
    if not isinstance(model, (Wav2Vec2KnnVqModel, Wav2Vec2Model)):
        raise InternalError(f"A model of {source} is a `{type(model).__name__}`, not a pretraining model.")

    model.eval()

    model.requires_grad_(False)

    return PretrainedModel(model=model, config=config, source=source, normalize_audio=normalize_audio)
