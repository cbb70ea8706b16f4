"""A run directory executes nothing when it is loaded or resumed, loads from any path, and a
resume checks the checkpoint directory the trainer really uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.cli import REPO_ROOT, recipe_command, recipe_env, run_recipe_command
from tests.test_ssl_recipe import ARCH, TINY_CPU_CONFIG, _write_synthetic_split

STEP = 2


class _RunsCode:
    """Unpickles into a call of ``os.mkdir(marker)``: evidence that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _plant(file: Path, marker: Path, *, protocol: int) -> None:
    """Adds a code-running entry to the state dict in ``file``, which would otherwise load normally."""
    state = torch.load(file, weights_only=False)

    state["payload"] = _RunsCode(marker)

    torch.save(state, file, pickle_protocol=protocol)


def _overrides(manifest_dir: Path, num_steps: int) -> list[str]:
    return [
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        f"model.arch={ARCH}",
        "dataset.min_audio_len=16000",
        "dataset.max_audio_len=32000",
        "dataset.max_num_elements=64000",
        f"regime.num_steps={num_steps}",
        f"regime.validate_every_n_steps={STEP}",
        f"regime.checkpoint_every_n_steps={STEP}",
        "regime.publish_metrics_every_n_steps=1",
        "lr_scheduler.config.num_warmup_steps=1",
    ]


def _command(output_dir: Path, manifest_dir: Path, num_steps: int, *extra: str) -> list[str]:
    command = recipe_command("recipes.wav2vec2_knnvq.ssl", output_dir, _overrides(manifest_dir, num_steps), config_file=TINY_CPU_CONFIG)  # fmt: skip

    return [*command[:-2], *extra, *command[-2:]]


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest_dir = tmp_path_factory.mktemp("manifests")

    audio_dir = tmp_path_factory.mktemp("audio")

    _write_synthetic_split(audio_dir, manifest_dir / "train.tsv", [40_000, 36_000, 52_000, 33_000], seed=3)
    _write_synthetic_split(audio_dir, manifest_dir / "valid.tsv", [30_000, 40_000], seed=4)

    return manifest_dir


@pytest.fixture(scope="module")
def trained_run(manifest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run of two steps, with the checkpoint of step 2 and every state file."""
    output_dir = tmp_path_factory.mktemp("runs") / "run"

    run_recipe_command(_command(output_dir, manifest_dir, STEP))

    return output_dir


@pytest.fixture
def poisoned_run(trained_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run whose ``model.yaml`` switches the weights-only unpickler off and
    whose model checkpoint runs code when unpickled. :returns: The run and the marker."""
    run_dir = tmp_path / "shared run"

    shutil.copytree(trained_run, run_dir)

    with (run_dir / "checkpoints/model.yaml").open("a", encoding="utf-8") as file:
        file.write("restrict: false\n")

    marker = tmp_path / "code-ran"

    _plant(run_dir / f"checkpoints/step_{STEP}/model/pp_00/tp_00/sdp_00.pt", marker, protocol=2)

    return run_dir, marker


def _load_features(run_dir: Path) -> object:
    from w2v_knnvq.features import load_pretrained_model

    return load_pretrained_model(run_dir)


def _load_export(run_dir: Path) -> object:
    from w2v_knnvq.export.loading import load_export_source

    return load_export_source(run_dir)


def _load_evaluation(run_dir: Path) -> object:
    from fairseq2.device import CPU

    from recipes.wav2vec2_knnvq.ssl.eval.recipe import load_pretraining_model
    from w2v_knnvq.runs import find_run_checkpoint

    return load_pretraining_model(find_run_checkpoint(run_dir), CPU)


def _load_pretrained_encoder(run_dir: Path) -> object:
    from fairseq2.runtime.dependency import get_dependency_resolver

    from recipes.wav2vec2_knnvq.asr.pretrained import PretrainedEncoderSection, resolve_pretrained_encoder

    section = PretrainedEncoderSection(path=run_dir)

    return resolve_pretrained_encoder(get_dependency_resolver(), section).load_shared_state_dict()


@pytest.mark.parametrize(
    "load", [_load_features, _load_export, _load_evaluation, _load_pretrained_encoder], ids=lambda f: f.__name__
)
@pytest.mark.e2e
def test_a_loaded_checkpoint_runs_no_code_whatever_its_card_says(
    poisoned_run: tuple[Path, Path], load: Callable[[Path], object]
) -> None:
    """Feature extraction, export, the pretraining evaluation and the ASR recipe's
    ``pretrained_encoder.path`` refuse the planted pickle, naming the file, and run nothing."""
    from fairseq2.recipe.error import RecipeError

    from w2v_knnvq.runs import RunCheckpointError

    run_dir, marker = poisoned_run

    with pytest.raises((RunCheckpointError, RecipeError)) as info:
        load(run_dir)

    assert not marker.exists()
    assert "sdp_00.pt: the pickle refers to `posix.mkdir`" in str(info.value)
    assert "could run code" in str(info.value)


@pytest.mark.e2e
def test_warm_start_from_a_run_runs_no_code(
    poisoned_run: tuple[Path, Path], manifest_dir: Path, tmp_path: Path
) -> None:
    """``init_from.path``, through the recipe's command line."""
    run_dir, marker = poisoned_run

    command = _command(tmp_path / "warm", manifest_dir, STEP)

    command.insert(command.index("--config") + 1, f"init_from.path={run_dir}")

    result = run_recipe_command(command, expected_returncode=2)

    assert not marker.exists()
    assert "sdp_00.pt: the pickle refers to `posix.mkdir`" in result.stdout + result.stderr


STATE_FILES = ["trainer/rank_00.pt", "optimizer/pp_00/tp_00/sdp_00.pt", "data_reader/dp_00.pt", "model/pp_00/tp_00/sdp_00.pt"]  # fmt: skip


@pytest.mark.parametrize("state_file", STATE_FILES)
@pytest.mark.e2e
def test_every_state_file_of_a_resume_is_checked_without_running_code(
    trained_run: Path, tmp_path: Path, state_file: str
) -> None:
    """fairseq2 unpickles the trainer, optimizer and data-reader states unrestricted: the
    check before a resume reads each with the restricted unpickler (pickle protocol 5, as
    fairseq2 writes them), refuses the planted one and names it."""
    from w2v_knnvq.runs import UnsafeCheckpointError, check_checkpoint_files

    step_dir = tmp_path / f"step_{STEP}"

    shutil.copytree(trained_run / f"checkpoints/step_{STEP}", step_dir)

    check_checkpoint_files(step_dir)

    marker = tmp_path / "code-ran"

    _plant(step_dir / state_file, marker, protocol=5)

    with pytest.raises(UnsafeCheckpointError, match=rf"{step_dir / state_file}: the pickle refers to `posix.mkdir`"):
        check_checkpoint_files(step_dir)

    assert not marker.exists()


@pytest.mark.e2e
def test_a_resume_refuses_a_planted_trainer_state(trained_run: Path, manifest_dir: Path, tmp_path: Path) -> None:
    """Through the command line, before the trainer restores anything."""
    output_dir = tmp_path / "run"

    shutil.copytree(trained_run, output_dir)

    marker = tmp_path / "code-ran"

    _plant(output_dir / f"checkpoints/step_{STEP}/trainer/rank_00.pt", marker, protocol=5)

    command = _command(output_dir, manifest_dir, 2 * STEP)

    result = run_recipe_command(command, expected_returncode=2)

    assert not marker.exists()
    assert f"The run cannot resume from step {STEP}: {output_dir}/checkpoints/step_{STEP}/trainer/rank_00.pt" in result.stdout + result.stderr  # fmt: skip


@pytest.mark.e2e
def test_a_run_in_a_folder_with_a_space_and_an_accent_loads(trained_run: Path, tmp_path: Path) -> None:
    """fairseq2 percent-encodes a card's path and never decodes it; the run's cards name
    their checkpoints as URIs written out."""
    from w2v_knnvq.features import load_pretrained_model
    from w2v_knnvq.runs import find_run_checkpoint

    run_dir = tmp_path / "my runs" / "écoute 1"

    shutil.copytree(trained_run, run_dir)

    pretrained = load_pretrained_model(run_dir)

    assert pretrained.source == str(run_dir / f"checkpoints/step_{STEP}/model")

    assert find_run_checkpoint(run_dir / f"checkpoints/step_{STEP}").step == STEP


def test_a_tokenizer_in_a_folder_with_a_space_and_an_accent_loads(tmp_path: Path) -> None:
    from w2v_knnvq.text.tokenizer import load_ctc_tokenizer, train_char_tokenizer

    card_path = train_char_tokenizer(["hello world", "a b c"], tmp_path / "café tokens", "chars")

    assert load_ctc_tokenizer(card_path).vocab_info.pad_idx == 0


@pytest.mark.e2e
def test_a_resume_with_another_process_count_is_refused_in_a_checkpoint_dir(
    trained_run: Path, manifest_dir: Path, tmp_path: Path
) -> None:
    """``--checkpoint-dir`` moves the checkpoints out of the output directory: the
    world-size check follows them, and the run-finding code finds them there."""
    from w2v_knnvq.runs import find_run_checkpoint

    checkpoints_dir = tmp_path / "elsewhere"

    shutil.copytree(trained_run / "checkpoints", checkpoints_dir)

    # As a run of two processes leaves it.
    shutil.copy(
        checkpoints_dir / f"step_{STEP}/trainer/rank_00.pt", checkpoints_dir / f"step_{STEP}/trainer/rank_01.pt"
    )

    command = _command(tmp_path / "out", manifest_dir, 2 * STEP, "--checkpoint-dir", str(checkpoints_dir))

    result = run_recipe_command(command, expected_returncode=2)

    assert "was written by 2 processes, but this run has 1" in result.stdout + result.stderr

    assert find_run_checkpoint(checkpoints_dir).step == STEP

    sweep_dir = tmp_path / "swept"

    shutil.copytree(trained_run / "checkpoints", sweep_dir / "ws_1.0123abcd")

    assert find_run_checkpoint(sweep_dir).checkpoints_dir == sweep_dir / "ws_1.0123abcd"


@pytest.mark.e2e
def test_a_second_run_in_a_busy_output_directory_is_refused(manifest_dir: Path, tmp_path: Path) -> None:
    """The first run holds the directory's lock until it ends; the second is refused in one
    line before it trains, and the lock goes with the first run's process."""
    import signal
    import time

    output_dir = tmp_path / "run"

    first = subprocess.Popen(
        _command(output_dir, manifest_dir, 1_000),
        cwd=REPO_ROOT,
        env=recipe_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    try:
        deadline = time.monotonic() + 120

        while not (output_dir / "metrics/train.jsonl").exists():
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run did not train within two minutes"

            time.sleep(0.1)

        second = run_recipe_command(_command(output_dir, manifest_dir, STEP), expected_returncode=2)

        assert f"{output_dir} is in use by another run (process {first.pid} on " in second.stderr
        assert "give this run another output directory" in second.stderr
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

    # A killed run leaves no lock behind: the next run resumes (here: starts) normally.
    run_recipe_command(_command(output_dir, manifest_dir, STEP))


def test_no_space_left_is_found_behind_fairseq2s_pickling_error() -> None:
    """torch's writer fails with a RuntimeError raised while handling the OSError; fairseq2
    wraps it twice, the last time as a state that "must contain pickeable objects only"."""
    import errno

    from fairseq2.checkpoint.manager import CheckpointStateNotValidError
    from fairseq2.io import DataNotPicklableError

    from recipes.common import _disk_full

    def saving(error: OSError) -> CheckpointStateNotValidError:
        try:
            try:
                try:
                    raise error
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos") from None
            except RuntimeError as ex:
                raise DataNotPicklableError() from ex
        except DataNotPicklableError as ex:
            wrapped = CheckpointStateNotValidError(4, "optimizer", "`optimizer` checkpoint must contain pickeable objects only.")  # fmt: skip

            wrapped.__cause__ = ex

            return wrapped

    assert _disk_full(saving(OSError(errno.ENOSPC, "No space left on device")))
    assert _disk_full(saving(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert not _disk_full(saving(OSError(errno.EIO, "Input/output error")))


@pytest.mark.e2e
def test_a_full_disk_names_the_folder_the_step_and_the_resume(manifest_dir: Path, tmp_path: Path) -> None:
    """A file system with room for one checkpoint (2.2 MB) but not two: step 4's does not
    fit; once the filler is deleted, the same command resumes from step 2. Needs the right
    to mount a tmpfs (root)."""
    mount_point = tmp_path / "small"

    mount_point.mkdir()

    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True)  # fmt: skip

    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")

    try:
        filler = mount_point / "filler"

        filler.write_bytes(bytes(4_800_000))

        checkpoints_dir = mount_point / "checkpoints"

        command = _command(tmp_path / "run", manifest_dir, 2 * STEP, f"--checkpoint-dir={checkpoints_dir}")

        command[command.index("--config") + 1 : command.index("--config") + 1] = ["regime.keep_last_n_checkpoints=null"]

        result = run_recipe_command(command, expected_returncode=1)

        assert f"No space left on {checkpoints_dir} while saving the checkpoint of step 4; free space and rerun the same command to resume from step 2." in result.stderr  # fmt: skip
        assert "bug report" not in result.stderr

        filler.unlink()

        resumed = run_recipe_command(command)

        assert "Resuming from step 2" in resumed.stdout + resumed.stderr
        assert (checkpoints_dir / "step_4/trainer").is_dir()
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.e2e
def test_a_card_by_name_runs_no_code_in_the_feature_tool(
    poisoned_run: tuple[Path, Path], manifest_dir: Path, tmp_path: Path
) -> None:
    """A user's asset card with ``restrict: false`` naming the planted checkpoint, loaded by
    name through ``tools/extract_features.py``."""
    run_dir, marker = poisoned_run

    cards_dir = tmp_path / "cards"

    cards_dir.mkdir()

    (cards_dir / "shared.yaml").write_text(
        "name: shared_model\n"
        "model_family: wav2vec2_knnvq\n"
        f"model_arch: {ARCH}\n"
        f"checkpoint: {run_dir / f'checkpoints/step_{STEP}/model'}\n"
        "restrict: false\n",
        encoding="utf-8",
    )

    command = [sys.executable, "tools/extract_features.py", "shared_model", str(manifest_dir / "valid.tsv"), str(tmp_path / "features")]  # fmt: skip

    result = run_recipe_command(command, expected_returncode=1, env={"FAIRSEQ2_USER_ASSET_DIR": str(cards_dir)})

    assert not marker.exists()
    assert "sdp_00.pt: the pickle refers to `posix.mkdir`" in result.stdout + result.stderr


def test_a_restricted_card_keeps_where_its_checkpoint_is() -> None:
    """Relative to the card's file, absolute with spaces and accents, or a URI of any scheme."""
    from fairseq2.assets import AssetCard

    from w2v_knnvq.runs import restricted_card

    def checkpoint(card: AssetCard) -> str:
        restricted = restricted_card(card)

        assert restricted.field("restrict").as_(bool) is True

        return restricted.field("checkpoint").as_(str)

    cards = Path("/shared/cards")

    relative = AssetCard("relative", {"checkpoint": "models/step_2/model", "restrict": False, "__base_path__": cards})

    assert checkpoint(relative) == "file:///shared/cards/models/step_2/model"

    derived = AssetCard("derived", {"model_arch": ARCH}, base=relative)

    assert checkpoint(derived) == "file:///shared/cards/models/step_2/model"

    assert (
        checkpoint(AssetCard("spaces", {"checkpoint": "/data/my runs/écoute/model"}))
        == "file:///data/my runs/écoute/model"
    )

    for uri in ("https://example.org/model.pt", "hg://facebook/wav2vec2-base", "file:///data/model"):
        assert checkpoint(AssetCard("remote", {"checkpoint": uri})) == uri
