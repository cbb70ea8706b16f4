"""Runs written directly, for tests that need a run's files but not a recipe run: what a
recipe leaves behind, ``config.yaml``, ``checkpoints/model.yaml`` (written by fairseq2's own
``ModelMetadataDumper``) and one model checkpoint per step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from torch.nn import Module

from fairseq2.checkpoint import ModelMetadataDumper
from fairseq2.runtime.dependency import get_dependency_resolver

from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_FAMILY, Wav2Vec2KnnVqModel, get_wav2vec2_knnvq_model_hub

KNNVQ_METHOD = "softmax-knn-ce"


def write_run(
    run_dir: Path,
    family: str,
    config: object,
    models: Mapping[int, Module],
    *,
    recipe_config: Mapping[str, object] | None = None,
    model_yaml: bool = True,
) -> Path:
    """Writes the run of ``models`` (step -> model) of ``family`` and ``config``.

    :param recipe_config: The run's ``config.yaml``; by default ``model.family`` only.
    :param model_yaml: Without it, the run lacks ``checkpoints/model.yaml``.
    :returns: ``run_dir``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)

    if recipe_config is None:
        recipe_config = {"model": {"family": family}}

    (run_dir / "config.yaml").write_text(yaml.safe_dump(dict(recipe_config)))

    checkpoints_dir = run_dir / "checkpoints"

    checkpoints_dir.mkdir(exist_ok=True)

    if model_yaml:
        get_dependency_resolver().resolve(ModelMetadataDumper).dump(checkpoints_dir, family, config)

    for step, model in models.items():
        shard_dir = checkpoints_dir / f"step_{step}" / "model" / "pp_00" / "tp_00"

        shard_dir.mkdir(parents=True)

        torch.save(model.state_dict(), shard_dir / "sdp_00.pt")

    return run_dir


def write_knnvq_run(
    run_dir: Path, arch: str, *, steps: tuple[int, ...] = (2, 4), model_yaml: bool = True
) -> dict[int, Wav2Vec2KnnVqModel]:
    """A ``wav2vec2_knnvq`` pretraining run of ``arch`` with :data:`KNNVQ_METHOD`: one model
    per step, each with other random weights (seeded by the step, far from the small seeds
    that recipe runs start their models with). :returns: the models."""
    hub = get_wav2vec2_knnvq_model_hub()

    config = hub.get_arch_config(arch)

    config.quantizer.method = KNNVQ_METHOD

    models = {}

    for step in steps:
        torch.manual_seed(1_000 + step)

        models[step] = hub.create_new_model(config)

    recipe_config = {
        "model": {
            "family": WAV2VEC2_KNNVQ_FAMILY,
            "arch": arch,
            "config_overrides": {"quantizer": {"method": KNNVQ_METHOD}},
        }
    }

    write_run(run_dir, WAV2VEC2_KNNVQ_FAMILY, config, models, recipe_config=recipe_config, model_yaml=model_yaml)

    return models
