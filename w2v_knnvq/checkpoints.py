"""Finds a checkpoint of a pretraining run and the model configuration it was trained with.

A pretraining recipe leaves ``OUT/config.yaml`` and ``OUT/checkpoints/`` behind; the latter
holds ``model.yaml`` (the full model configuration fairseq2 writes) and one
``step_N/model/`` directory per saved step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from fairseq2.assets import AssetCard

STEP_DIR_PATTERN: Final = re.compile(r"step_(\d+)")

SINGLE_PROCESS_MODEL_FILE: Final = Path("model") / "pp_00" / "tp_00" / "sdp_00.pt"
"""Where fairseq2's native checkpointer keeps the weights of a single-process run,
relative to a ``step_N`` directory."""


class PretrainingCheckpointError(ValueError):
    """A path that names no usable pretraining checkpoint; the message names the file and the fix."""


class CheckpointStepNotFoundError(PretrainingCheckpointError):
    """The ``checkpoints`` directory has no checkpoint of the requested step (or none at all)."""

    checkpoints_dir: Path
    step: int | None
    available_steps: list[int]

    def __init__(self, checkpoints_dir: Path, step: int | None, available_steps: list[int]) -> None:
        if step is None:
            message = f"{checkpoints_dir}: holds no `step_N` checkpoint yet; train longer or check the path."
        else:
            message = f"{checkpoints_dir}: has no checkpoint of step {step}; available steps: {', '.join(map(str, available_steps))}."

        super().__init__(message)

        self.checkpoints_dir = checkpoints_dir
        self.step = step
        self.available_steps = available_steps


@dataclass(frozen=True, kw_only=True)
class PretrainingCheckpoint:
    """One saved step of a pretraining run."""

    checkpoints_dir: Path

    step: int

    file: Path | None = None
    """The checkpoint file the caller named, if it named one."""

    @property
    def run_dir(self) -> Path:
        """The recipe's output directory."""
        return self.checkpoints_dir.parent

    @property
    def step_dir(self) -> Path:
        return self.checkpoints_dir / f"step_{self.step}"

    @property
    def model_dir(self) -> Path:
        """The model checkpoint as fairseq2 loads it (all shards)."""
        return self.step_dir / "model"


def locate_pretraining_checkpoint(path: Path, *, step: int | None = None) -> PretrainingCheckpoint:
    """Finds the checkpoint that an existing ``path`` names.

    :param path: A pretraining output directory, its ``checkpoints`` directory, one
        ``checkpoints/step_N`` directory, or a file inside one.
    :param step: The training step; ``None`` takes the one ``path`` names, else the last.

    :raises PretrainingCheckpointError: if ``path`` is no pretraining output or
        ``step`` contradicts it.
    :raises CheckpointStepNotFoundError: if the requested step was not saved.
    """
    checkpoints_dir, path_step = _find_checkpoints_dir(path)

    if path_step is not None:
        if step is not None and step != path_step:
            raise PretrainingCheckpointError(f"{path}: is the checkpoint of step {path_step}, but step {step} was asked for; drop one of the two.")

        return PretrainingCheckpoint(checkpoints_dir=checkpoints_dir, step=path_step, file=path if path.is_file() else None)

    steps = sorted(int(match[1]) for child in checkpoints_dir.iterdir() if (match := STEP_DIR_PATTERN.fullmatch(child.name)) and child.is_dir())

    if not steps or (step is not None and step not in steps):
        raise CheckpointStepNotFoundError(checkpoints_dir, step, steps)

    return PretrainingCheckpoint(checkpoints_dir=checkpoints_dir, step=steps[-1] if step is None else step)


def _find_checkpoints_dir(path: Path) -> tuple[Path, int | None]:
    """:returns: The run's ``checkpoints`` directory and, if ``path`` lies inside one
    ``step_N`` directory, its step."""
    if path.is_dir():
        for candidate in (path, path / "checkpoints"):
            if _is_checkpoints_dir(candidate):
                return candidate, None

    for parent in (path, *path.parents):
        match = STEP_DIR_PATTERN.fullmatch(parent.name)

        if match is not None and _is_checkpoints_dir(parent.parent):
            return parent.parent, int(match[1])

    raise PretrainingCheckpointError(
        f"{path}: is no pretraining output; expected the directory a pretraining recipe wrote to (with `checkpoints/`), "
        "its `checkpoints` directory, or a `checkpoints/step_N` directory or a file in one."
    )


def _is_checkpoints_dir(path: Path) -> bool:
    # fairseq2 names it `checkpoints`; `model.yaml` marks one that was renamed or moved.
    return path.is_dir() and (path.name == "checkpoints" or (path / "model.yaml").is_file())


@dataclass(frozen=True, kw_only=True)
class PretrainedModelDescription:
    card: AssetCard
    """``model_family``, ``model_arch`` and/or ``model_config``, and ``checkpoint``
    (the step's model directory)."""

    config_file: Path
    """The file the model configuration was read from."""

    recipe_config: dict[str, object]
    """The run's ``config.yaml``; empty if it has none."""


def read_pretrained_model_description(checkpoint: PretrainingCheckpoint) -> PretrainedModelDescription:
    """Reads the model configuration of ``checkpoint``'s run from ``checkpoints/model.yaml``
    or else from the ``model`` section of ``config.yaml``.

    :raises PretrainingCheckpointError: if neither file describes the model.
    """
    config_file = checkpoint.run_dir / "config.yaml"

    recipe_config = _read_yaml(config_file) if config_file.is_file() else {}

    metadata_file = checkpoint.checkpoints_dir / "model.yaml"

    card_metadata: dict[str, object] = {"checkpoint": str(checkpoint.model_dir)}

    if metadata_file.is_file():
        metadata = _read_yaml(metadata_file)

        family = metadata.get("model_family")

        if not isinstance(family, str) or not isinstance(metadata.get("model_config"), dict):
            raise PretrainingCheckpointError(f"{metadata_file}: lacks `model_family` or `model_config`; the file is not one fairseq2 wrote.")

        card_metadata.update(model_family=family, model_config=metadata["model_config"])

        return PretrainedModelDescription(card=AssetCard(str(checkpoint.model_dir), card_metadata), config_file=metadata_file, recipe_config=recipe_config)

    section = recipe_config.get("model")

    if not isinstance(section, dict):
        raise PretrainingCheckpointError(
            f"{checkpoint.file or checkpoint.model_dir}: neither {metadata_file} nor a `model` section in {config_file} was found, "
            "so the model's architecture is unknown; keep the recipe's output directory intact."
        )

    family = section.get("family")

    if not isinstance(family, str):
        raise PretrainingCheckpointError(f"{config_file}: the `model` section names no `family`; the run did not train a model from scratch.")

    card_metadata["model_family"] = family

    if section.get("arch") is not None:
        card_metadata["model_arch"] = section["arch"]

    if section.get("config_overrides") is not None:
        card_metadata["model_config"] = section["config_overrides"]

    return PretrainedModelDescription(card=AssetCard(str(checkpoint.model_dir), card_metadata), config_file=config_file, recipe_config=recipe_config)


def _read_yaml(file: Path) -> dict[str, object]:
    try:
        content = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as ex:
        raise PretrainingCheckpointError(f"{file}: cannot be read as YAML ({ex}).") from ex

    if not isinstance(content, dict):
        raise PretrainingCheckpointError(f"{file}: expected a YAML mapping at the top level.")

    return content
