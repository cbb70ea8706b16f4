"""The pretrained wav2vec 2.0 model whose encoder the ASR model starts from.

It is named either by an asset card (``pretrained_encoder.name``, e.g. ``last_checkpoint``
with ``common.assets.prev_checkpoint_dir`` pointing at a pretraining run's checkpoints) or
by a path (``pretrained_encoder.path``): a pretraining output directory, its
``checkpoints`` directory, one ``checkpoints/step_N`` directory, or a model file inside one.
Both the ``wav2vec2_knnvq`` and fairseq2's ``wav2vec2`` family work: the ASR model takes
the structural fields of its ``encoder_config`` and the weights of its encoder. Given by
path, the pretraining run's ``config.yaml`` also fixes ``dataset.normalize_audio``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final, final

from torch import Tensor
from torch.nn import Module

from fairseq2.assets import AssetCard, AssetStore
from fairseq2.logging import log
from fairseq2.models import ModelFamily, get_model_family_name
from fairseq2.models.wav2vec2 import Wav2Vec2EncoderConfig
from fairseq2.recipe.error import RecipeError
from fairseq2.runtime.dependency import DependencyResolver
from fairseq2.utils.structured import ValueConverter
from fairseq2.utils.validation import ValidationResult

from w2v_knnvq.runs import RunCheckpoint, restricted_card

from ...common import find_recipe_checkpoint, load_pretrained_state_dict, validate_model_step

ENCODER_FINE_TUNING_FIELDS: Final = frozenset(
    {
        "feature_grad_scale",
        "first_pass_dropout_p",
        "dropout_p",
        "attn_dropout_p",
        "ffn_inner_dropout_p",
        "layer_drop_p",
    }
)
"""Fields of :class:`Wav2Vec2EncoderConfig` that regularize fine-tuning; all others fix
the encoder's parameters and are taken from the pretrained model."""

SHARED_PARAMETER_PREFIXES: Final = ("encoder_frontend.", "encoder.", "masker.temporal_mask_embed")
"""The parameters the ASR model takes from the pretrained model: the CNN, the
Transformer and the learned mask embedding."""


@dataclass(kw_only=True)
class PretrainedEncoderSection:
    """Names the pretrained model: exactly one of ``name`` and ``path``."""

    name: str | None = None
    """An asset card of a pretrained model."""

    path: Path | None = None
    """A pretraining output directory, its ``checkpoints`` directory, a
    ``checkpoints/step_N`` directory, or a model file inside one."""

    step: int | None = None
    """With a directory ``path``: the training step of the checkpoint; ``None`` takes the last."""

    load_weights: bool = True
    """``False`` takes only the encoder's structure and trains it from random
    initialization: the baseline that shows what pretraining adds."""

    def validate(self) -> ValidationResult:
        result = ValidationResult()

        if (self.name is None) == (self.path is None):
            result.add_error("Exactly one of `name` and `path` must be specified.")

        validate_model_step(result, self.step, self.path)

        return result


@final
@dataclass(frozen=True, kw_only=True)
class PretrainedEncoder:
    """The pretrained model whose encoder the ASR model starts from: its card, the
    configuration of its encoder and (on demand) its weights."""

    card: AssetCard

    encoder_config: Wav2Vec2EncoderConfig

    source: str
    """How messages name the model: its checkpoint directory or its asset card name."""

    run: RunCheckpoint | None = None
    """The pretraining run, if the model was named by a path to one."""

    def load_shared_state_dict(self) -> dict[str, Tensor]:
        """Loads the pretrained model on CPU and returns its :data:`SHARED_PARAMETER_PREFIXES` entries."""
        log.info("Loading the pretrained model {} to initialize the encoder.", self.source)

        state_dict = load_pretrained_state_dict(self.card, self.run, self.source)

        return {key: value for key, value in state_dict.items() if key.startswith(SHARED_PARAMETER_PREFIXES)}


def resolve_pretrained_encoder(resolver: DependencyResolver, section: PretrainedEncoderSection) -> PretrainedEncoder:
    """:raises RecipeError: if the model cannot be found or has no wav2vec 2.0 encoder."""
    if section.path is not None:
        run = find_recipe_checkpoint(
            section.path,
            section.step,
            path_option="pretrained_encoder.path",
            checkpoint_option="pretrained_encoder.step",
        )

        return _describe_encoder(resolver, run.card, str(run.model_dir), run)

    if section.name is not None:
        return _describe_encoder(resolver, _retrieve_card(resolver, section.name), section.name, None)

    raise RecipeError("`pretrained_encoder.name` or `pretrained_encoder.path` must be specified.")


def _retrieve_card(resolver: DependencyResolver, name: str) -> AssetCard:
    card = resolver.resolve(AssetStore).maybe_retrieve_card(name)

    if card is None:
        raise RecipeError(
            f"`pretrained_encoder.name` must name an asset card, but no card is named {name}. "
            "For a pretraining run, set `common.assets.prev_checkpoint_dir` to its `checkpoints` "
            "directory and use `last_checkpoint` or `checkpoint_step_N`, or set `pretrained_encoder.path`."
        )

    return restricted_card(card)


def _describe_encoder(
    resolver: DependencyResolver, card: AssetCard, source: str, run: RunCheckpoint | None
) -> PretrainedEncoder:
    """:raises RecipeError: if ``card`` describes no model with a wav2vec 2.0 encoder."""
    family = resolver.resolve(ModelFamily, key=get_model_family_name(card))

    encoder_config = getattr(family.get_model_config(card), "encoder_config", None)

    if not isinstance(encoder_config, Wav2Vec2EncoderConfig):
        raise RecipeError(
            f"The pretrained model {source} must have a wav2vec 2.0 encoder, but is of family `{family.name}` "
            "instead; name a `wav2vec2_knnvq` or `wav2vec2` model."
        )

    return PretrainedEncoder(card=card, encoder_config=encoder_config, source=source, run=run)


def check_audio_normalization(pretrained: PretrainedEncoder, normalize_audio: bool, config_file: Path) -> None:
    """Makes sure fine-tuning feeds the encoder audio scaled as in pretraining.

    :param normalize_audio: ``dataset.normalize_audio`` of the fine-tuning run.
    :param config_file: Where the fine-tuning run records its configuration.
    :raises RecipeError: if the pretraining run's ``config.yaml`` says otherwise.
    """
    run = pretrained.run

    if run is None or run.normalize_audio is None or run.normalize_audio == normalize_audio:
        return

    flag = "true" if run.normalize_audio else "false"

    raise RecipeError(
        f"`dataset.normalize_audio` must be {flag} as in the pretraining of {pretrained.source} ({run.config_file}), "
        f"but is {str(normalize_audio).lower()} instead in the fine-tuning config ({config_file}); the encoder would "
        f"see audio scaled differently. Set `dataset.normalize_audio={flag}`."
    )


def share_encoder_config(
    resolver: DependencyResolver, pretrained: PretrainedEncoder, model_overrides: MutableMapping[str, object]
) -> None:
    """Sets the structural ``encoder_config`` fields of the ASR model overrides to the
    pretrained model's.

    :param model_overrides: ``model.config_overrides`` of the recipe, unstructured.
    :raises RecipeError: if an override the user set explicitly differs from the
        pretrained model, since its weights could not be loaded.
    """
    encoder_overrides = model_overrides.setdefault("encoder_config", {})

    if not isinstance(encoder_overrides, MutableMapping):
        raise RecipeError(
            "`model.config_overrides.encoder_config` must be a mapping of encoder fields, "
            f"but is of type `{type(encoder_overrides)}` instead."
        )

    value_converter = resolver.resolve(ValueConverter)

    conflicts = []

    for name in _structural_encoder_fields():
        pretrained_value = value_converter.unstructure(getattr(pretrained.encoder_config, name))

        if name not in encoder_overrides:
            encoder_overrides[name] = pretrained_value
        elif _as_plain(encoder_overrides[name]) != _as_plain(pretrained_value):
            conflicts.append(f"{name}: {encoder_overrides[name]!r} here, {pretrained_value!r} pretrained")

    if conflicts:
        raise RecipeError(
            f"`model.config_overrides.encoder_config` differs from the encoder of the pretrained model "
            f"{pretrained.source}, so its weights cannot be loaded: {'; '.join(conflicts)}. "
            "Remove these overrides; the encoder structure is taken from the pretrained model."
        )


def _structural_encoder_fields() -> list[str]:
    return [field.name for field in fields(Wav2Vec2EncoderConfig) if field.name not in ENCODER_FINE_TUNING_FIELDS]


def _as_plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]

    if isinstance(value, Mapping):
        return {k: _as_plain(v) for k, v in value.items()}

    return value


def load_pretrained_encoder(model: Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copies the shared parameters of the pretrained model into ``model``.

    :raises RecipeError: if a shared parameter is missing from ``state_dict`` or has
        another shape.
    """
    model_state = model.state_dict()

    expected = {key for key in model_state if key.startswith(SHARED_PARAMETER_PREFIXES)}

    missing = sorted(expected - state_dict.keys())

    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs. {tuple(model_state[key].shape)}"
        for key in sorted(expected & state_dict.keys())
        if state_dict[key].shape != model_state[key].shape
    ]

    if missing or mismatched:
        raise RecipeError(
            f"The encoder of the pretrained model {source} does not fit the ASR model "
            f"(missing: {missing[:5] or 'none'}; shape differs, pretrained vs. ASR: {mismatched[:5] or 'none'}). "
            "The encoder configurations differ; let the recipe take the encoder structure from the pretrained model."
        )

    model.load_state_dict({key: state_dict[key] for key in expected}, strict=False)

    log.info("Initialized {} encoder tensors from the pretrained model {}.", len(expected), source)
