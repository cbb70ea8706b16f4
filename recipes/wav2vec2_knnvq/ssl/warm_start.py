"""The ``init_from`` section: continued pretraining from an existing wav2vec 2.0 model.

A new run copies the CNN, the frontend and the Transformer of the named model (a fairseq2
``wav2vec2`` model such as the ``wav2vec2_base`` card, or a ``wav2vec2_knnvq`` one) into
its model, and its contrastive projections where their shapes agree; the quantizer starts
fresh (see :mod:`w2v_knnvq.wav2vec2.warm_start`). A resumed run restores its own
checkpoint instead and ignores the section.

The model is named by an asset card (``init_from.name``; ``common.assets.extra_paths``
adds the directory of a card written for a downloaded checkpoint file) or by a path
(``init_from.path``): a training output directory, its ``checkpoints`` directory, one
``checkpoints/step_N`` directory, or a model file inside one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from torch.nn import Module

from fairseq2.assets import AssetCard
from fairseq2.logging import log
from fairseq2.models import get_model_family_name
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY
from fairseq2.recipe import RecipeContext
from fairseq2.recipe.config import ModelSection
from fairseq2.recipe.error import RecipeError
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.runs import RunCheckpoint, restricted_card
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY
from w2v_knnvq.wav2vec2.warm_start import WarmStartError, copy_pretrained_encoder, describe_differences

from ...common import find_recipe_checkpoint, load_pretrained_state_dict, validate_model_step

INIT_FAMILIES: Final = (WAV2VEC2_FAMILY, WAV2VEC2_KNNVQ_FAMILY)
"""The families whose models hold a wav2vec 2.0 pretraining encoder to start from."""


@dataclass(kw_only=True)
class InitFromSection:
    """Names the pretrained model a new run starts from: at most one of ``name`` and
    ``path``; neither (the default) initializes the model randomly."""

    name: str | None = None
    """An asset card of a ``wav2vec2`` or ``wav2vec2_knnvq`` model with a checkpoint."""

    path: Path | None = None
    """A training output directory, its ``checkpoints`` directory, a ``checkpoints/step_N``
    directory, or a model file inside one."""

    step: int | None = None
    """With a directory ``path``: the training step of the checkpoint; ``None`` takes the last."""

    @property
    def is_set(self) -> bool:
        return self.name is not None or self.path is not None

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if self.name is not None and self.path is not None:
            result.add_error("At most one of `name` and `path` must be specified, but both are.")

        validate_model_step(result, self.step, self.path)

        return result


def init_from_pretrained(
    context: RecipeContext, model: Module, section: InitFromSection, *, newly_initialized: bool, normalize_audio: bool
) -> None:
    """Copies the encoder of the model ``section`` names into a newly initialized ``model``.

    :param normalize_audio: ``dataset.normalize_audio`` of this run, which must match the
        pretraining run's where its ``config.yaml`` records it.
    :raises RecipeError: if the model cannot be found, belongs to another family, saw
        differently scaled audio, or has an encoder of another shape.
    """
    if not section.is_set:
        return

    if not newly_initialized:
        _check_new_model(context.resolver.resolve(ModelSection))

        log.info("The run resumes from its own checkpoint; `init_from` applies to its first start only.")

        return

    card, source, run = _find_pretrained(context, section)

    _check_family(card, source)

    if run is not None and run.normalize_audio is not None and run.normalize_audio != normalize_audio:
        flag = str(run.normalize_audio).lower()

        raise RecipeError(
            f"`dataset.normalize_audio` must be {flag} as in the pretraining of {source} ({run.config_file}), "
            f"but is {str(normalize_audio).lower()} instead; the encoder would see audio scaled differently. "
            f"Set `dataset.normalize_audio={flag}`."
        )

    if any(parameter.is_meta for parameter in model.parameters()):
        # fairseq2 builds the model on data-parallel rank 0 only and broadcasts it from there.
        return

    log.info("Loading the pretrained model {} to initialize the CNN and the Transformer.", source)

    pretrained_state = load_pretrained_state_dict(card, run, source)

    try:
        summary = copy_pretrained_encoder(model, pretrained_state, source=source)
    except WarmStartError as ex:
        raise RecipeError(_mismatch_message(ex, source)) from None

    log.info("Initialized the model from {}: {}.", source, summary.describe())


def _check_new_model(section: ModelSection) -> None:
    if section.name is not None or section.path is not None:
        raise RecipeError(
            "`init_from` starts a new model from the encoder of a pretrained one, but `model.name` or "
            "`model.path` loads a whole model instead. Set `model.family` and `model.arch`, or drop `init_from`."
        )


def _find_pretrained(context: RecipeContext, section: InitFromSection) -> tuple[AssetCard, str, RunCheckpoint | None]:
    """:returns: The card of the pretrained model, how messages name it, and its run if
    ``section`` gives a path."""
    if section.path is not None:
        run = find_recipe_checkpoint(
            section.path, section.step, path_option="init_from.path", checkpoint_option="init_from.step"
        )

        return run.card, str(run.model_dir), run

    name = section.name

    if name is None:
        raise RecipeError("`init_from.name` or `init_from.path` must be specified.")

    card = context.asset_store.maybe_retrieve_card(name)

    if card is None:
        raise RecipeError(
            f"`init_from.name` must name an asset card, but no card is named {name}. Name a card such as "
            "`wav2vec2_base` (`python -m fairseq2.assets list --kind model`), add the directory of your own card "
            "with `common.assets.extra_paths`, or set `init_from.path` to a training run."
        )

    return restricted_card(card), name, None


def _check_family(card: AssetCard, source: str) -> None:
    family = get_model_family_name(card)

    if family not in INIT_FAMILIES:
        raise RecipeError(
            f"The pretrained model {source} must be of family `{WAV2VEC2_FAMILY}` or `{WAV2VEC2_KNNVQ_FAMILY}`, "
            f"but is of family `{family}` instead; name a wav2vec 2.0 pretraining model."
        )

    if card.maybe_get_field("checkpoint") is None:
        raise RecipeError(
            f"The asset card {source} describes an architecture but has no `checkpoint` to initialize from; "
            "name a card with a checkpoint."
        )


def _mismatch_message(ex: WarmStartError, source: str) -> str:
    if ex.matching_archs:
        fix = f"Set `model.arch` to an architecture that matches it: {' or '.join(ex.matching_archs)}."
    else:
        fix = (
            "No architecture of this family matches it; set `model.config_overrides.encoder_config` "
            "to the encoder configuration of the pretrained model."
        )

    return (
        f"`init_from`: the encoder of the pretrained model {source} does not fit the model of this run "
        f"(`model.arch`): {describe_differences(ex.differences)}. {fix}"
    )
