"""Features in fairseq's k-means layout, k-means units and the quantizer's codes as units, on
the bundled corpus: the files read back by the format's own conventions, parts equal to the
whole."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tests.runs import write_knnvq_run
from tools import extract_features, learn_units

pytest.importorskip("sklearn")

DEV_DIR = Path(__file__).resolve().parent / "data" / "minispeech" / "dev"

NUM_UTTERANCES = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")

    write_knnvq_run(run_dir, "tiny_2x320", steps=(2,))

    return run_dir


@pytest.fixture(scope="module")
def features(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 1 and the codes of the 16 dev utterances in 3 parts (6, 6 and 4 utterances),
    one utterance per forward pass, so that the parts must equal the whole bit for bit."""
    output_dir = tmp_path_factory.mktemp("features")

    tool = extract_features

    for rank in range(3):
        args = [str(run_dir), str(DEV_DIR), str(output_dir), "--layers", "1", "--layout", "fairseq", "--nshard", "3", "--rank", str(rank), "--batch-size", "1"]  # fmt: skip

        assert tool.main(args) == 0

    return output_dir


def _read(kind_dir: Path, stem: str) -> tuple[np.ndarray, list[int]]:
    """As fairseq's ``load_feature_shard`` reads a part."""
    with open(kind_dir / f"{stem}.len") as file:
        lengths = [int(line.rstrip()) for line in file]

    return np.load(kind_dir / f"{stem}.npy", mmap_mode="r"), lengths


def test_parts_are_fairseqs_contiguous_ranges_and_equal_the_whole(
    run_dir: Path, features: Path, tmp_path: Path
) -> None:
    from w2v_knnvq.features.fairseq_layout import part_range

    assert [list(part_range(16, 3, rank)) for rank in range(3)] == [list(range(6)), list(range(6, 12)), list(range(12, 16))]  # fmt: skip

    tool = extract_features

    whole_args = [
        str(run_dir),
        str(DEV_DIR),
        str(tmp_path),
        "--layers",
        "1",
        "--layout",
        "fairseq",
        "--batch-size",
        "1",
    ]

    assert tool.main(whole_args) == 0

    for kind in ("cnn", "layer1", "codes"):
        whole, whole_lengths = _read(tmp_path / kind, "dev_0_1")

        parts = [_read(features / kind, f"dev_{rank}_3") for rank in range(3)]

        assert [len(lengths) for _, lengths in parts] == [6, 6, 4]
        assert [n for _, lengths in parts for n in lengths] == whole_lengths
        assert len(whole_lengths) == NUM_UTTERANCES and whole.shape[0] == sum(whole_lengths)

        np.testing.assert_array_equal(np.concatenate([frames for frames, _ in parts]), whole)

    assert _read(tmp_path / "layer1", "dev_0_1")[0].dtype == np.float32
    assert _read(tmp_path / "codes", "dev_0_1")[0].shape[1] == 2

    # The work shards are gone; a rerun finds the part complete and writes nothing.
    assert not list((tmp_path / ".work").iterdir())

    before = (tmp_path / "layer1/dev_0_1.npy").stat().st_mtime_ns

    assert tool.main(whole_args) == 0

    assert (tmp_path / "layer1/dev_0_1.npy").stat().st_mtime_ns == before


def test_kmeans_units_of_a_layer(features: Path, tmp_path: Path) -> None:
    tool = learn_units

    km_dir = tmp_path / "km"

    common = [str(features), "--kind", "layer1", "--split", "dev", "--nshard", "3"]

    assert tool.main(["learn", *common, "--clusters", "8", "--fraction", "1", "--n-init", "2", "-o", str(km_dir)]) == 0

    from w2v_knnvq.features.units import assign_units, load_kmeans

    centroids, record = load_kmeans(km_dir)

    assert centroids.shape == (8, 64) and record["kind"] == "layer1" and record["n_clusters"] == 8

    lines_per_rank = []

    for rank in range(3):
        assert tool.main(["write", *common, "--rank", str(rank), "--kmeans", str(km_dir), "-o", str(tmp_path / "units")]) == 0  # fmt: skip

        lines_per_rank.append((tmp_path / f"units/dev_{rank}_3.km").read_text().splitlines())

    lines = [line for rank_lines in lines_per_rank for line in rank_lines]

    assert len(lines) == NUM_UTTERANCES

    # Each line is its utterance's frames, each the nearest centroid.
    frames, lengths = _read(features / "layer1", "dev_0_3")

    units = [int(unit) for unit in lines[0].split()]

    assert len(units) == lengths[0]

    distances = ((np.asarray(frames[: lengths[0]])[:, None, :] - centroids[None]) ** 2).sum(-1)

    assert units == distances.argmin(1).tolist() == assign_units(frames[: lengths[0]], centroids).tolist()

    assert len({unit for line in lines for unit in line.split()}) > 1

    assert tool.main(["write", *common, "--rank", "0", "--kmeans", str(km_dir), "--dedup", "-o", str(tmp_path / "dedup")]) == 0  # fmt: skip

    deduplicated = (tmp_path / "dedup/dev_0_3.km").read_text().splitlines()

    assert deduplicated == [" ".join(unit for unit, _ in itertools.groupby(line.split())) for line in lines_per_rank[0]]


def test_the_quantizers_codes_as_one_product_id_or_streams(features: Path, tmp_path: Path) -> None:
    tool = learn_units

    common = [str(features), "--kind", "codes", "--split", "dev", "--nshard", "3", "--rank", "1"]

    assert tool.main(["write", *common, "-o", str(tmp_path / "product")]) == 0
    assert tool.main(["write", *common, "--codes", "streams", "-o", str(tmp_path / "streams")]) == 0

    codes, lengths = _read(features / "codes", "dev_1_3")

    product = " ".join(map(str, (codes[: lengths[0], 0] * 320 + codes[: lengths[0], 1]).tolist()))

    assert (tmp_path / "product/dev_1_3.km").read_text().splitlines()[0] == product

    for group in range(2):
        stream = (tmp_path / f"streams/dev_1_3.g{group}.km").read_text().splitlines()

        assert len(stream) == 6
        assert stream[0] == " ".join(map(str, codes[: lengths[0], group].tolist()))

    assert tool.main(["write", *common, "--kmeans", str(tmp_path), "-o", str(tmp_path / "bad")]) == 1


def test_wrong_parts_and_options_are_named(
    run_dir: Path, features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extract = extract_features

    assert extract.main([str(run_dir), str(DEV_DIR), str(tmp_path), "--layout", "fairseq", "--nshard", "2", "--rank", "2"]) == 1  # fmt: skip
    assert "`rank` must be in [0, 2) with `nshard` at least 1, but is 2 instead." in capsys.readouterr().err

    assert extract.main([str(run_dir), str(DEV_DIR), str(tmp_path), "--nshard", "2"]) == 1
    assert "--nshard, --rank and --split apply to --layout fairseq only" in capsys.readouterr().err

    units = learn_units

    assert units.main(["write", str(features), "--kind", "layer1", "--split", "dev", "--nshard", "4", "-o", str(tmp_path)]) == 1  # fmt: skip
    assert "--kind layer1 needs --kmeans" in capsys.readouterr().err

    assert units.main(["learn", str(features), "--kind", "layer1", "--split", "dev", "--nshard", "4", "-o", str(tmp_path)]) == 1  # fmt: skip
    assert "dev_0_4.len: missing; extract part 0 of 4 of dev first" in capsys.readouterr().err
