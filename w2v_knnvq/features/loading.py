"""Loads a pretrained ``wav2vec2_knnvq`` model from an asset card, a pretraining
output directory or a checkpoint file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fairseq2.assets import AssetCard, AssetConfigLoader, AssetNotFoundError, AssetStore
from fairseq2.device import CPU, Device
from fairseq2.runtime.dependency import get_dependency_resolver

from w2v_knnvq.wav2vec2 import (
    WAV2VEC2_KNNVQ_FAMILY,
    Wav2Vec2KnnVqConfig,
    Wav2Vec2KnnVqModel,
    get_wav2vec2_knnvq_model_hub,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")

# Where fairseq2's native checkpointer keeps the weights of a single-process run.
_SHARD_FILE = Path("model") / "pp_00" / "tp_00" / "sdp_00.pt"


class PretrainedModelError(ValueError):
    """A model source that cannot be loaded; the message names the file and the fix."""


@dataclass(kw_only=True)
class PretrainedModel:
    model: Wav2Vec2KnnVqModel
    """In eval mode."""

    config: Wav2Vec2KnnVqConfig

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
    """Loads a pretrained ``wav2vec2_knnvq`` model in eval mode.

    :param source: One of

        - an asset card name whose card has a ``checkpoint``;
        - a pretraining output directory (holding ``config.yaml`` and ``checkpoints/``);
        - a run's ``checkpoints`` directory or one of its ``step_N`` directories;
        - a checkpoint file (``sdp_00.pt``) inside such a run.

    :param step: The training step to load from an output or ``checkpoints``
        directory; the last one if ``None``.

    :raises PretrainedModelError: if nothing loadable is found, the run belongs to
        another model family, or the weights do not fit the run's configuration.
    """
    # Initializes fairseq2 (and with it this project's extension) on first use.
    get_dependency_resolver()

    path = Path(source)

    if path.exists():
        return _load_from_path(path, step, device, dtype)

    if step is not None:
        raise PretrainedModelError(f"{source}: `step` only applies to a pretraining output directory, and no such path exists.")

    return _load_from_card(str(source), device, dtype)


def _load_from_card(name: str, device: Device, dtype: torch.dtype) -> PretrainedModel:
    resolver = get_dependency_resolver()

    try:
        card = resolver.resolve(AssetStore).retrieve_card(name)
    except AssetNotFoundError:
        raise PretrainedModelError(
            f"{name}: neither an existing path nor a known asset card; pass a pretraining output directory, "
            "a checkpoint file, or a card name from `python -m fairseq2.assets list --kind model`."
        ) from None

    _check_family(card.field("model_family").as_(str), name)

    if card.maybe_get_field("checkpoint") is None:
        raise PretrainedModelError(
            f"{name}: the asset card describes an architecture but has no `checkpoint`; "
            "write a card with `base: " + name + "` and a `checkpoint` path, or pass a checkpoint directly."
        )

    config = _config_from_card(card)

    model = get_wav2vec2_knnvq_model_hub().load_model(card, config=config, device=device, dtype=dtype)

    return _ready(model, config, name, normalize_audio=False)


def _load_from_path(path: Path, step: int | None, device: Device, dtype: torch.dtype) -> PretrainedModel:
    checkpoint_file, run_dir = _locate_checkpoint(path, step)

    metadata = _read_run_metadata(run_dir, checkpoint_file)

    card = AssetCard(str(checkpoint_file), metadata.card)

    config = _config_from_card(card)

    hub = get_wav2vec2_knnvq_model_hub()

    try:
        model = hub.load_custom_model(checkpoint_file, config, device=device, dtype=dtype)
    except Exception as ex:
        # fairseq2 wraps the family's checkpoint check; its message says which tensors differ.
        reason = ex.__cause__ if ex.__cause__ is not None else ex

        raise PretrainedModelError(
            f"{checkpoint_file}: the weights do not fit the configuration in {metadata.config_file} ({reason})"
        ) from ex

    return _ready(model, config, str(checkpoint_file), normalize_audio=metadata.normalize_audio)


def _locate_checkpoint(path: Path, step: int | None) -> tuple[Path, Path]:
    """:returns: The checkpoint file and the run's output directory."""
    if path.is_file():
        if step is not None:
            raise PretrainedModelError(f"{path}: `step` cannot be combined with a checkpoint file.")

        # OUT/checkpoints/step_N/model/pp_00/tp_00/sdp_00.pt
        for parent in path.parents:
            if parent.name == "checkpoints":
                return path, parent.parent

        raise PretrainedModelError(
            f"{path}: a checkpoint file must lie inside a pretraining run's `checkpoints/step_N/` directory "
            "so that the run's configuration can be read."
        )

    if _STEP_DIR.match(path.name):
        if step is not None:
            raise PretrainedModelError(f"{path}: `step` cannot be combined with a step directory.")

        return _shard_file(path), path.parent.parent

    checkpoints_dir = path if path.name == "checkpoints" else path / "checkpoints"

    if not checkpoints_dir.is_dir():
        raise PretrainedModelError(
            f"{path}: not a pretraining output directory (no `checkpoints/` in it); pass the directory the recipe wrote to."
        )

    steps = sorted(int(match.group(1)) for child in checkpoints_dir.iterdir() if (match := _STEP_DIR.match(child.name)) and child.is_dir())

    if not steps:
        raise PretrainedModelError(f"{checkpoints_dir}: holds no `step_N` checkpoint yet; train longer or check the path.")

    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise PretrainedModelError(f"{checkpoints_dir}: has no checkpoint of step {step}; available steps: {', '.join(map(str, steps))}.")

    return _shard_file(checkpoints_dir / f"step_{step}"), checkpoints_dir.parent


def _shard_file(step_dir: Path) -> Path:
    checkpoint_file = step_dir / _SHARD_FILE

    if not checkpoint_file.is_file():
        if (step_dir / "model" / "pp_00" / "tp_01").exists() or (step_dir / "model" / "pp_01").exists():
            raise PretrainedModelError(f"{step_dir}: the checkpoint is sharded for model parallelism, which feature extraction does not load.")

        raise PretrainedModelError(f"{step_dir}: no `{_SHARD_FILE.as_posix()}` in it; the checkpoint is incomplete or not a fairseq2 model checkpoint.")

    return checkpoint_file


@dataclass(kw_only=True)
class _RunMetadata:
    card: dict[str, object]
    """``model_family`` plus ``model_arch`` and/or ``model_config``."""

    config_file: Path

    normalize_audio: bool


def _read_run_metadata(run_dir: Path, checkpoint_file: Path) -> _RunMetadata:
    """Reads the model configuration from ``checkpoints/model.yaml`` (the full
    configuration fairseq2 writes beside the checkpoints) or else from the
    ``model`` section of ``config.yaml``."""
    config_file = run_dir / "config.yaml"

    recipe_config = _read_yaml(config_file) if config_file.is_file() else {}

    dataset = recipe_config.get("dataset")

    normalize_audio = bool(dataset.get("normalize_audio", False)) if isinstance(dataset, dict) else False

    metadata_file = run_dir / "checkpoints" / "model.yaml"

    if metadata_file.is_file():
        metadata = _read_yaml(metadata_file)

        family = metadata.get("model_family")

        if not isinstance(family, str) or not isinstance(metadata.get("model_config"), dict):
            raise PretrainedModelError(f"{metadata_file}: lacks `model_family` or `model_config`; the file is not one fairseq2 wrote.")

        _check_family(family, str(checkpoint_file))

        return _RunMetadata(
            card={"model_family": family, "model_config": metadata["model_config"]},
            config_file=metadata_file,
            normalize_audio=normalize_audio,
        )

    section = recipe_config.get("model")

    if not isinstance(section, dict):
        raise PretrainedModelError(
            f"{checkpoint_file}: neither {metadata_file} nor a `model` section in {config_file} was found, "
            "so the model's architecture is unknown; keep the recipe's output directory intact."
        )

    family = section.get("family")

    if not isinstance(family, str):
        raise PretrainedModelError(f"{config_file}: the `model` section names no `family`; the run did not train a model from scratch.")

    _check_family(family, str(checkpoint_file))

    card: dict[str, object] = {"model_family": family}

    if section.get("arch") is not None:
        card["model_arch"] = section["arch"]

    if section.get("config_overrides") is not None:
        card["model_config"] = section["config_overrides"]

    return _RunMetadata(card=card, config_file=config_file, normalize_audio=normalize_audio)


def _read_yaml(file: Path) -> dict[str, object]:
    try:
        content = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as ex:
        raise PretrainedModelError(f"{file}: cannot be read as YAML ({ex}).") from ex

    if not isinstance(content, dict):
        raise PretrainedModelError(f"{file}: expected a YAML mapping at the top level.")

    return content


def _check_family(family: str, source: str) -> None:
    if family != WAV2VEC2_KNNVQ_FAMILY:
        raise PretrainedModelError(
            f"{source}: holds a `{family}` model, but feature extraction loads `{WAV2VEC2_KNNVQ_FAMILY}` models; "
            f"use fairseq2's own tools for `{family}` checkpoints."
        )


def _config_from_card(card: AssetCard) -> Wav2Vec2KnnVqConfig:
    """Builds the configuration a card describes.

    fairseq2's ``get_model_config`` also runs its object validator, which expects
    every nested ``validate()`` to return a result; the quantizer's raises instead.
    Merging here and validating with the family's own check sidesteps that.
    """
    hub = get_wav2vec2_knnvq_model_hub()

    arch_field = card.maybe_get_field("model_arch")

    if arch_field is None:
        base_config = Wav2Vec2KnnVqConfig()
    else:
        arch = arch_field.as_(str)

        if arch not in hub.get_archs():
            raise PretrainedModelError(f"{card.name}: unknown architecture `{arch}`; known: {', '.join(sorted(hub.get_archs()))}.")

        base_config = hub.get_arch_config(arch)

    loader = get_dependency_resolver().resolve(AssetConfigLoader)

    try:
        config = loader.load(card, base_config, config_key="model_config")
    except Exception as ex:
        raise PretrainedModelError(f"{card.name}: the model configuration cannot be read ({ex}).") from ex

    if not isinstance(config, Wav2Vec2KnnVqConfig):
        raise PretrainedModelError(f"{card.name}: the configuration is of type {type(config).__name__}, not Wav2Vec2KnnVqConfig.")

    try:
        config.quantizer.check()
    except ValueError as ex:
        raise PretrainedModelError(f"{card.name}: invalid quantizer configuration ({ex}).") from ex

    result = config.validate()

    if result.has_error():
        raise PretrainedModelError(f"{card.name}: invalid model configuration ({result}).")

    return config


def _ready(model: Wav2Vec2KnnVqModel, config: Wav2Vec2KnnVqConfig, source: str, *, normalize_audio: bool) -> PretrainedModel:
    model.eval()

    model.requires_grad_(False)

    return PretrainedModel(model=model, config=config, source=source, normalize_audio=normalize_audio)
