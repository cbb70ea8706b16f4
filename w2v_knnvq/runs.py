"""Finds a checkpoint of a recipe's run and the configuration it was trained with.

Every recipe of this project (pretraining, fine-tuning, the image autoencoder) leaves
``OUT/config.yaml`` and ``OUT/checkpoints/`` behind; the latter holds ``model.yaml``
(the model family and configuration fairseq2's trainer writes) and one ``step_N/model/``
directory per saved step, possibly sharded. This module is the one place that turns a
path into a model card: it asks fairseq2's :class:`ModelMetadataLoader` for the cards of
the checkpoint directory (``last_checkpoint``, ``best_checkpoint``,
``checkpoint_step_N``), and the family hubs load them.

Nothing a run directory holds runs code when it is loaded: every card this module hands out
loads its checkpoint with torch's weights-only unpickler whatever ``model.yaml`` says
(:func:`restricted_card`), and :func:`check_checkpoint_files` reads the other state files of
a step with :mod:`~w2v_knnvq.restricted_pickle` before a recipe resumes from them.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Final, TypeVar

import torch
import yaml
from torch.nn import Module

from fairseq2.assets import AssetCard, AssetCardError, AssetMetadataError, StandardAssetStore
from fairseq2.checkpoint import ModelMetadataLoader
from fairseq2.device import CPU, Device
from fairseq2.model_checkpoint import CorruptModelCheckpointError
from fairseq2.models import ModelHub, load_model
from fairseq2.runtime.dependency import get_dependency_resolver
from fairseq2.utils.uri import Uri

from w2v_knnvq import restricted_pickle
from w2v_knnvq.files import card_file_uri

STEP_DIR_PATTERN: Final = re.compile(r"step_(\d+)")

CheckpointChoice = int | str
"""A step number, ``"last"`` or ``"best"`` (the best validation score; the last step if
the run recorded no scores)."""

ModelT = TypeVar("ModelT", bound=Module)
ConfigT = TypeVar("ConfigT")


class RunCheckpointError(ValueError):
    """A path that names no usable checkpoint of a run; the message names the file and the fix."""


class UnsafeCheckpointError(RunCheckpointError):
    """A checkpoint file whose pickle refers to a global that fairseq2 never stores: loading
    it could run code, so it is refused."""


class CheckpointStepNotFoundError(RunCheckpointError):
    """The ``checkpoints`` directory has no checkpoint of the requested step (or none at all)."""

    def __init__(self, checkpoints_dir: Path, step: int | None, available_steps: list[int]) -> None:
        if step is None:
            message = f"{checkpoints_dir}: holds no `step_N` checkpoint yet; train longer or check the path."
        else:
            steps = ", ".join(map(str, available_steps)) or "none"

            message = f"{checkpoints_dir}: has no checkpoint of step {step}; available steps: {steps}."

        super().__init__(message)

        self.checkpoints_dir = checkpoints_dir
        self.step = step
        self.available_steps = available_steps


@dataclass(frozen=True, kw_only=True)
class RunCheckpoint:
    """One saved step of a run, as fairseq2 describes it."""

    card: AssetCard
    """The model card: ``model_family``, ``model_config`` and ``checkpoint`` (the step's
    ``model`` directory, all shards)."""

    checkpoints_dir: Path

    step: int

    @property
    def run_dir(self) -> Path:
        """The recipe's output directory."""
        return self.checkpoints_dir.parent

    @property
    def model_dir(self) -> Path:
        return self.checkpoints_dir / f"step_{self.step}" / "model"

    @property
    def metadata_file(self) -> Path:
        """``checkpoints/model.yaml``, where the model configuration comes from."""
        return self.checkpoints_dir / "model.yaml"

    @property
    def config_file(self) -> Path:
        """The recipe configuration of the run, ``config.yaml``."""
        return self.run_dir / "config.yaml"

    @property
    def family(self) -> str:
        return self.card.field("model_family").as_(str)

    @cached_property
    def recipe_config(self) -> Mapping[str, object]:
        """The run's ``config.yaml``; empty if the run directory holds none."""
        if not self.config_file.is_file():
            return {}

        return _read_yaml(self.config_file)

    def recipe_option(self, section: str, name: str) -> object | None:
        """``section.name`` of the run's recipe configuration; ``None`` if it is not set."""
        values = self.recipe_config.get(section)

        return values.get(name) if isinstance(values, Mapping) else None

    @property
    def normalize_audio(self) -> bool | None:
        """``dataset.normalize_audio`` of the run: whether the model saw standardized
        waveforms. ``None`` if the run's configuration does not say."""
        value = self.recipe_option("dataset", "normalize_audio")

        return value if isinstance(value, bool) else None


def run_normalize_audio(run: RunCheckpoint) -> bool:
    """``dataset.normalize_audio`` of the run, which its ``config.yaml`` must record: the
    model only knows audio read this way, so whatever reads audio for it (an evaluation, an
    exported feature extractor) must do the same.

    :raises RunCheckpointError: if the run's ``config.yaml`` is missing or does not say.
    """
    if not run.config_file.is_file():
        raise RunCheckpointError(
            f"{run.config_file} does not exist, so the audio normalization of the run is unknown; "
            "keep the run's output directory intact."
        )

    normalize_audio = run.normalize_audio

    if normalize_audio is None:
        raise RunCheckpointError(
            f"`dataset.normalize_audio` in {run.config_file} must be a boolean, but is "
            f"{run.recipe_option('dataset', 'normalize_audio')!r} instead; the file is not one the recipe wrote, "
            "keep the run's output directory intact."
        )

    return normalize_audio


def find_run_checkpoint(path: Path, *, checkpoint: CheckpointChoice | None = None) -> RunCheckpoint:
    """Finds the checkpoint that an existing ``path`` names.

    :param path: A recipe's output directory, its ``checkpoints`` directory, one
        ``checkpoints/step_N`` directory, or a file inside one.
    :param checkpoint: A step number, ``"last"`` or ``"best"``; ``None`` takes the step
        ``path`` names, else the last.

    :raises RunCheckpointError: if ``path`` is no run output or ``checkpoint``
        contradicts it.
    :raises CheckpointStepNotFoundError: if the requested step was not saved.
    """
    path = path.expanduser().resolve()

    if not path.exists():
        raise RunCheckpointError(
            f"{path}: does not exist; give the output directory of a training run or one of its checkpoints."
        )

    checkpoints_dir, path_step = _find_checkpoints_dir(path)

    if path_step is not None:
        if checkpoint is not None and checkpoint != path_step:
            raise RunCheckpointError(
                f"{path}: is the checkpoint of step {path_step}, but checkpoint {checkpoint} was asked for; drop one of the two."
            )

        checkpoint = path_step

    store = _load_checkpoint_cards(checkpoints_dir)

    steps = sorted(
        int(match[1])
        for child in checkpoints_dir.iterdir()
        if (match := STEP_DIR_PATTERN.fullmatch(child.name)) and child.is_dir()
    )

    if checkpoint is None or checkpoint == "last":
        names = ["last_checkpoint"]
    elif checkpoint == "best":
        names = ["best_checkpoint", "last_checkpoint"]
    elif isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        checkpoint = int(checkpoint)

        if checkpoint not in steps:
            raise CheckpointStepNotFoundError(checkpoints_dir, checkpoint, steps)

        names = [f"checkpoint_step_{checkpoint}"]
    else:
        raise RunCheckpointError(
            f"`checkpoint` must be a step number, 'last' or 'best', but is '{checkpoint}' instead."
        )

    for name in names:
        card = store.maybe_retrieve_card(name)

        if card is not None:
            step = int(Path(card.field("checkpoint").as_(str)).parent.name.removeprefix("step_"))

            return RunCheckpoint(card=restricted_card(card), checkpoints_dir=checkpoints_dir, step=step)

    raise CheckpointStepNotFoundError(checkpoints_dir, None, steps)


def load_run_model(
    run: RunCheckpoint,
    hub: ModelHub[ModelT, ConfigT],
    family: str,
    *,
    config: ConfigT | None = None,
    device: Device = CPU,
    dtype: torch.dtype = torch.float32,
) -> ModelT:
    """Loads the model of ``run`` through its family's hub, all shards, in eval mode: for
    callers that know the family in advance (fairseq2's advice for its hubs).

    :param family: The family of ``hub``, which ``run`` must hold.
    :param config: Overrides the configuration of ``model.yaml`` (e.g. other dropouts).
    :raises RunCheckpointError: if ``run`` holds a model of another family, or its weights
        do not fit its configuration.
    """
    _check_run_family(run, (family,))

    return _load_checked(run, lambda: hub.load_model(run.card, device=device, dtype=dtype, config=config))


def load_run_model_of_families(
    run: RunCheckpoint,
    families: Collection[str],
    *,
    device: Device = CPU,
    dtype: torch.dtype = torch.float32,
) -> Module:
    """Loads the model of ``run`` through fairseq2's ``load_model``, which takes the family
    from the run's card, all shards, in eval mode: for callers that accept several families.

    :raises RunCheckpointError: if ``run`` holds a model of none of ``families``, or its
        weights do not fit its configuration.
    """
    _check_run_family(run, families)

    return _load_checked(run, lambda: load_model(run.card, device=device, dtype=dtype))


def _check_run_family(run: RunCheckpoint, families: Collection[str]) -> None:
    if run.family not in families:
        expected = " or ".join(f"`{family}`" for family in families)

        raise RunCheckpointError(
            f"{run.metadata_file}: holds a `{run.family}` model, but a {expected} model was expected; "
            f"load it with the tools of the `{run.family}` family."
        )


def _load_checked(run: RunCheckpoint, load: Callable[[], ModelT]) -> ModelT:
    """Runs ``load``, naming the file and the fix of what it raises, and sets the model in eval mode."""
    try:
        model = load()
    except (AssetCardError, ValueError) as ex:
        # A file that the weights-only unpickler refused: name the global it refers to.
        check_card_checkpoint(run.card)

        # fairseq2 wraps a state dict that does not fit the model (and the family's own
        # checkpoint check) in an asset card error; its cause says which tensors differ.
        cause = ex.__cause__

        if isinstance(ex, ValueError) or isinstance(cause, (CorruptModelCheckpointError, ValueError)):
            raise RunCheckpointError(
                f"{run.model_dir}: the weights do not fit the configuration in {run.metadata_file} ({cause or ex})"
            ) from ex

        raise RunCheckpointError(
            f"{run.model_dir}: cannot be loaded ({ex}); check that the checkpoint is complete."
        ) from ex

    model.eval()

    return model


def restricted_card(card: AssetCard) -> AssetCard:
    """``card`` whose checkpoint loads with torch's weights-only unpickler.

    fairseq2 switches the restriction off for a card with ``restrict: false``; a run
    directory or a downloaded card must not be able to do that, so every card that this
    project loads a model from passes through here. A local ``checkpoint`` path (relative
    ones resolved against the card's file, as fairseq2 resolves them) is named with
    :func:`~w2v_knnvq.files.card_file_uri`, so that a path with a space or a non-ASCII
    letter is found.
    """
    fields: dict[str, object] = {"restrict": True}

    if (checkpoint := local_path_field(card, "checkpoint")) is not None:
        fields["checkpoint"] = checkpoint

    return AssetCard(card.name, fields, base=card)


def local_path_field(card: AssetCard, name: str) -> str | None:
    """The field ``name`` of ``card`` as :func:`~w2v_knnvq.files.card_file_uri` names it, if
    it is a local path (a relative one resolved against the file of the card that sets it,
    as fairseq2 resolves it); ``None`` if the card has no such field or it is a URI already."""
    holder: AssetCard | None = card

    while holder is not None and name not in holder.metadata:
        holder = holder.base

    if holder is None:
        return None

    value = holder.metadata[name]

    if not isinstance(value, str) or Uri.maybe_parse(value) is not None:
        return None

    path = Path(value)

    base_path = holder.metadata.get("__base_path__")

    if not path.is_absolute() and isinstance(base_path, Path):
        path = base_path / path

    return card_file_uri(path)


def read_validation_records(output_dir: Path) -> list[dict[str, object]]:
    """The records of a run's ``metrics/valid.jsonl`` (fairseq2's JSONL recorder), in order;
    a line cut by a kill is skipped, and a run that never validated has none."""
    try:
        lines = (output_dir / "metrics/valid.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []

    records = []

    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue

        if isinstance(record, dict):
            records.append(record)

    return records


def load_restricted(file: Path) -> object:
    """Loads a checkpoint file (any of fairseq2's state files) with
    :mod:`~w2v_knnvq.restricted_pickle`.

    :raises UnsafeCheckpointError: if the file refers to a global that could run code.
    :raises RunCheckpointError: if the file cannot be read as a checkpoint.
    """
    try:
        return torch.load(file, map_location=CPU, mmap=True, weights_only=False, pickle_module=restricted_pickle)
    except restricted_pickle.ForbiddenGlobalError as ex:
        raise UnsafeCheckpointError(
            f"{file}: {ex}; loading it could run code, so it is refused. A checkpoint that fairseq2 writes holds "
            "only tensors, numbers and strings: do not use this run directory unless you trust its source, and "
            "then take an earlier step or rewrite the file."
        ) from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as ex:
        raise RunCheckpointError(
            f"{file}: cannot be read as a checkpoint file ({ex}); delete its step directory and resume from an earlier step."
        ) from ex


def check_checkpoint_files(path: Path) -> None:
    """Reads the ``.pt`` file ``path``, or every one in the directory ``path`` (a saved
    step), with :func:`load_restricted`, so that a resume that unpickles them (fairseq2 loads
    the trainer, optimizer and data-reader states unrestricted) never meets one that runs code.

    :raises UnsafeCheckpointError: naming the first file that refers to a forbidden global.
    """
    for file in [path] if path.is_file() else sorted(path.rglob("*.pt")):
        load_restricted(file)


def check_card_checkpoint(card: AssetCard) -> None:
    """After the weights-only unpickler refused the checkpoint of ``card``: if it is a local
    file or directory, names the file and the global that made it refuse.

    :raises UnsafeCheckpointError: if a file of the checkpoint refers to a forbidden global.
    """
    field = card.maybe_get_field("checkpoint")

    if field is None:
        return

    try:
        uri = field.as_uri()
    except AssetCardError:
        return

    if uri.scheme == "file" and (path := uri.to_path()).exists():
        check_checkpoint_files(path)


def _load_checkpoint_cards(checkpoints_dir: Path) -> StandardAssetStore:
    metadata_file = checkpoints_dir / "model.yaml"

    if not metadata_file.is_file():
        raise RunCheckpointError(
            f"{metadata_file}: does not exist, so the model's family and configuration are unknown; "
            "keep the run's `checkpoints` directory as the trainer wrote it."
        )

    loader = get_dependency_resolver().resolve(ModelMetadataLoader)

    try:
        return StandardAssetStore([loader.load(checkpoints_dir)])
    except (AssetMetadataError, OSError) as ex:
        raise RunCheckpointError(
            f"{metadata_file}: cannot be read as the model card of a training run ({ex})."
        ) from None


def _find_checkpoints_dir(path: Path) -> tuple[Path, int | None]:
    """:returns: The run's ``checkpoints`` directory and, if ``path`` lies inside one
    ``step_N`` directory, its step."""
    if path.is_dir():
        sweep_dir = _sweep_dir(path)

        # A sweep directory of `--checkpoint-dir` is itself the checkpoints directory.
        for candidate in (path, path / "checkpoints", sweep_dir / "checkpoints", sweep_dir):
            if _is_checkpoints_dir(candidate):
                return candidate, None

    for parent in (path, *path.parents):
        match = STEP_DIR_PATTERN.fullmatch(parent.name)

        if match is not None and _is_checkpoints_dir(parent.parent):
            return parent.parent, int(match[1])

    raise RunCheckpointError(
        f"{path}: is no training output; expected the directory a recipe wrote to (with `checkpoints/`), "
        "its `checkpoints` directory, or a `checkpoints/step_N` directory or a file in one."
    )


SWEEP_DIR_PATTERN: Final = re.compile(r"ws_\d+\..+")


def _sweep_dir(path: Path) -> Path:
    """The one sweep directory (``ws_{world_size}.{hash}``) that fairseq2 made in the output
    directory ``path`` of a run without ``common.no_sweep_dir``; ``path`` if it has none.

    :raises RunCheckpointError: if it has several: their runs are different configurations.
    """
    sweeps = sorted(
        child
        for child in path.iterdir()
        if SWEEP_DIR_PATTERN.fullmatch(child.name) and ((child / "checkpoints").is_dir() or _is_checkpoints_dir(child))
    )

    if len(sweeps) > 1:
        names = ", ".join(sweep.name for sweep in sweeps)

        raise RunCheckpointError(
            f"{path}: holds the runs of {len(sweeps)} configurations ({names}); give the one to use, e.g. {sweeps[-1]}."
        )

    return sweeps[0] if sweeps else path


def _is_checkpoints_dir(path: Path) -> bool:
    # fairseq2 names it `checkpoints`; `model.yaml` marks one that was renamed or moved.
    return path.is_dir() and (path.name == "checkpoints" or (path / "model.yaml").is_file())


def _read_yaml(file: Path) -> Mapping[str, object]:
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as ex:
        raise RunCheckpointError(f"{file}: cannot be read as YAML ({ex}).") from ex

    if not isinstance(content, dict):
        raise RunCheckpointError(f"{file}: expected a YAML mapping at the top level.")

    return content
