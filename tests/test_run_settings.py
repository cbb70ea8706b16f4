"""The settings a run's config.yaml fixes for whatever reads audio for its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fairseq2.assets import AssetCard

from w2v_knnvq.runs import RunCheckpoint, RunCheckpointError, run_normalize_audio


def _run(run_dir: Path, recipe_config: dict[str, object] | None) -> RunCheckpoint:
    run_dir.mkdir(parents=True, exist_ok=True)

    if recipe_config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe_config))

    return RunCheckpoint(card=AssetCard("checkpoint_step_1", {}), checkpoints_dir=run_dir / "checkpoints", step=1)


@pytest.mark.parametrize("value", [True, False])
def test_normalize_audio_is_the_runs(tmp_path: Path, value: bool) -> None:
    assert run_normalize_audio(_run(tmp_path, {"dataset": {"normalize_audio": value}})) is value


def test_normalize_audio_not_recorded_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RunCheckpointError, match=r"`dataset.normalize_audio` in .*config.yaml must be a boolean, but is 'yes'"):  # fmt: skip
        run_normalize_audio(_run(tmp_path / "a", {"dataset": {"normalize_audio": "yes"}}))

    with pytest.raises(RunCheckpointError, match=r"config.yaml does not exist, so the audio normalization"):
        run_normalize_audio(_run(tmp_path / "b", None))
