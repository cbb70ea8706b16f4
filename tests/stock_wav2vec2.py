"""Tiny models of fairseq2's own ``wav2vec2`` family, saved the ways fairseq2 reads them:
as an asset card with a checkpoint file, and as the output directory of a training run."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY, Wav2Vec2Config, Wav2Vec2Model, get_wav2vec2_model_hub
from fairseq2.runtime.dependency import get_dependency_resolver
from fairseq2.utils.structured import ValueConverter

from tests.runs import write_run
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS

STOCK_CARD = "test_wav2vec2_tiny"
"""The name of the card :func:`write_stock_card` writes."""


def tiny_stock_config(arch: str = "tiny_2x320") -> Wav2Vec2Config:
    """A ``wav2vec2`` configuration with the encoder, codebooks and projections of ``arch``."""
    ours = WAV2VEC2_KNNVQ_ARCHS[arch]()

    return Wav2Vec2Config(
        encoder_config=ours.encoder_config,
        final_dim=ours.final_dim,
        quantized_dim=ours.quantizer.output_dim,
        num_codebooks=ours.quantizer.num_codebooks,
        num_codebook_entries=ours.quantizer.codebook_size,
    )


def create_stock_model(config: Wav2Vec2Config, seed: int) -> Wav2Vec2Model:
    get_dependency_resolver()

    torch.manual_seed(seed)

    return get_wav2vec2_model_hub().create_new_model(config)


def _unstructured(config: Wav2Vec2Config) -> object:
    return get_dependency_resolver().resolve(ValueConverter).unstructure(config)


def write_stock_card(card_dir: Path, model: Wav2Vec2Model, config: Wav2Vec2Config) -> Path:
    """Writes ``card_dir/{STOCK_CARD}.yaml`` and its checkpoint ``{"model": state_dict}``,
    the format of fairseq2's published ``wav2vec2`` checkpoints. :returns: The card file."""
    card_dir.mkdir(parents=True, exist_ok=True)

    torch.save({"model": model.state_dict()}, card_dir / "tiny_stock.pt")

    card = {
        "name": STOCK_CARD,
        "model_family": "wav2vec2",
        "model_arch": "base",
        "model_config": _unstructured(config),
        "checkpoint": "tiny_stock.pt",
    }

    card_file = card_dir / f"{STOCK_CARD}.yaml"

    card_file.write_text(yaml.safe_dump(card))

    return card_file


def write_stock_run(run_dir: Path, model: Wav2Vec2Model, config: Wav2Vec2Config, *, step: int = 2) -> Path:
    """The run the pretraining recipe leaves behind for the ``wav2vec2`` baseline, with ``model``
    at ``step``. :returns: ``run_dir``."""
    return write_run(run_dir, WAV2VEC2_FAMILY, config, {step: model})
