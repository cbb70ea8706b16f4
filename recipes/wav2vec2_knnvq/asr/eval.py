"""Evaluates a fine-tuned CTC model on one split: greedy decoding, WER and CER.

Examples::

    python -m recipes.wav2vec2_knnvq.asr.eval FINETUNE_DIR --manifest-dir manifests --split test-clean --output-dir eval
    python -m recipes.wav2vec2_knnvq.asr.eval FINETUNE_DIR --checkpoint 20000 --manifest-dir manifests --split dev-other --output-dir eval

``FINETUNE_DIR`` is the output directory of ``python -m recipes.wav2vec2_knnvq.asr`` (or its
``checkpoints`` directory); its ``config.yaml`` names the tokenizer and whether the audio
is normalized, as in training. The split is ``{manifest-dir}/{split}.tsv`` with its ``.wrd``
transcripts. Written to ``--output-dir``:

- ``{split}.hyp.txt`` and ``{split}.ref.txt``: one transcript per line, in manifest order;
- ``{split}.tsv``: ``id<TAB>ref<TAB>hyp`` with a header line;
- ``{split}.json``: WER and CER in percent with their edit counts and the settings used, also printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fairseq2 import init_fairseq2
from fairseq2.assets import AssetCard, AssetMetadataError, StandardAssetStore
from fairseq2.checkpoint import ModelMetadataLoader
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.datasets import DatasetError, SyncMode
from fairseq2.device import Device
from fairseq2.gang import create_fake_gangs
from fairseq2.models import load_model
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrModel
from fairseq2.runtime.dependency import DependencyResolver

from recipes.wav2vec2_knnvq.asr.tokenizer import trained_tokenizer_card
from w2v_knnvq.data.asr_dataset import AsrManifestDataset, AsrReadOptions
from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.text import ErrorRateMetric, ErrorRates, check_vocab_size, ctc_greedy_decode, load_ctc_tokenizer


class EvalError(Exception):
    """A model, tokenizer or split that cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class Transcription:
    index: int
    """The position of the utterance in its manifest."""

    utterance_id: str

    reference: str

    hypothesis: str


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.wav2vec2_knnvq.asr.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    parser.add_argument("model_dir", type=Path, help="output directory of a fine-tuning run")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="'best' (lowest validation WER; the last one if the run kept no scores), 'last', or a step number",
    )
    parser.add_argument("--manifest-dir", type=Path, required=True, help="folder with {split}.tsv and {split}.wrd")
    parser.add_argument("--split", required=True, help="the manifest name, e.g. test-clean")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer card or .model file (default: the one the fine-tuning run used)",
    )
    parser.add_argument(
        "--max-num-elements", type=int, default=3_200_000, help="audio samples per batch, padding included"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    return parser.parse_args(argv)


def find_checkpoint_dir(model_dir: Path) -> Path:
    for candidate in (model_dir, model_dir / "checkpoints"):
        if (candidate / "model.yaml").is_file():
            return candidate

    raise EvalError(
        f"{model_dir} is no fine-tuning output: neither it nor {model_dir / 'checkpoints'} holds a model.yaml."
    )


def checkpoint_card(resolver: DependencyResolver, checkpoint_dir: Path, checkpoint: str) -> AssetCard:
    """:param checkpoint: ``best``, ``last`` or a step number."""
    try:
        store = StandardAssetStore([resolver.resolve(ModelMetadataLoader).load(checkpoint_dir)])
    except (AssetMetadataError, OSError) as ex:
        raise EvalError(f"The checkpoints in {checkpoint_dir} cannot be listed: {ex}") from None

    if checkpoint == "best":
        names = ["best_checkpoint", "last_checkpoint"]
    elif checkpoint == "last":
        names = ["last_checkpoint"]
    elif checkpoint.isdigit():
        names = [f"checkpoint_step_{int(checkpoint)}"]
    else:
        raise EvalError(f"--checkpoint must be 'best', 'last' or a step number, but is '{checkpoint}'.")

    for name in names:
        card = store.maybe_retrieve_card(name)

        if card is not None:
            return card

    steps = sorted(p.name for p in checkpoint_dir.glob("step_*"))

    raise EvalError(f"{checkpoint_dir} has no checkpoint '{checkpoint}'; it has {steps or 'none'}.")


@dataclass(frozen=True, kw_only=True)
class FinetuneRunSettings:
    """What evaluation must take over from the ``config.yaml`` a fine-tuning run wrote."""

    config_file: Path

    tokenizer_path: Path
    """The tokenizer the run trained with."""

    normalize_audio: bool
    """``dataset.normalize_audio`` of the run: the model only knows audio read this way."""


def read_finetune_run_settings(checkpoint_dir: Path) -> FinetuneRunSettings:
    """Reads the tokenizer and audio settings of the run that wrote ``checkpoint_dir``."""
    config_file = checkpoint_dir.parent / "config.yaml"

    if not config_file.is_file():
        raise EvalError(
            f"{config_file} does not exist, so the run's tokenizer and audio normalization are unknown; "
            "keep the fine-tuning output directory intact."
        )

    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as ex:
        raise EvalError(f"{config_file} cannot be read as YAML: {ex}") from None

    if not isinstance(config, dict):
        raise EvalError(f"{config_file} holds no recipe configuration; expected a YAML mapping.")

    dataset_section = config.get("dataset") or {}

    normalize_audio = dataset_section.get("normalize_audio")

    if not isinstance(normalize_audio, bool):
        raise EvalError(
            f"{config_file} has no boolean `dataset.normalize_audio` ({normalize_audio!r}); "
            "the file is not one the fine-tuning recipe wrote."
        )

    tokenizer_section = config.get("tokenizer") or {}

    if tokenizer_section.get("path") is None:
        tokenizer_path = trained_tokenizer_card(checkpoint_dir.parent, tokenizer_section.get("name", "ctc_char"))
    else:
        tokenizer_path = Path(tokenizer_section["path"]).expanduser()

        # The recipe records the path it resolved; a relative one cannot be resolved again
        # since the directory the run was started in is unknown.
        if not tokenizer_path.is_absolute():
            raise EvalError(
                f"{config_file} gives `tokenizer.path` as the relative path {tokenizer_path}, relative to the "
                "directory the run was started in, which is unknown; pass the tokenizer with --tokenizer."
            )

    return FinetuneRunSettings(config_file=config_file, tokenizer_path=tokenizer_path, normalize_audio=normalize_audio)


def eval_read_options(longest: int, max_num_elements: int, *, normalize_audio: bool) -> AsrReadOptions:
    """Reads a split whole, in manifest order, as the recipe reads its validation split.

    :param longest: The number of samples of the split's longest utterance.
    """
    return AsrReadOptions(
        min_audio_len=1,
        max_audio_len=longest,
        max_num_elements=max(max_num_elements, longest),
        normalize_audio=normalize_audio,
        shuffle_window=1,
        batch_shuffle_window=1,
        num_parallel_calls=2,
        sync_mode=SyncMode.UNTIL_LAST,
    )


def transcribe(
    model: Wav2Vec2AsrModel,
    tokenizer: Tokenizer,
    dataset: AsrManifestDataset,
    split: str,
    device: Device,
    max_num_elements: int,
    *,
    normalize_audio: bool,
) -> list[Transcription]:
    """Decodes every utterance of ``split`` greedily.

    :param normalize_audio: Standardize each utterance, as the model was fine-tuned.
    :returns: Transcriptions in manifest order.
    """
    utterances = dataset.read_split(split).utterances

    longest = max(utterance.num_samples for utterance in utterances)

    options = eval_read_options(longest, max_num_elements, normalize_audio=normalize_audio)

    reader = dataset.create_reader(split, tokenizer, create_fake_gangs(device), options)

    decoder = tokenizer.create_decoder()

    progress = ProgressLine(f"decoding {split}", len(utterances))

    transcriptions = []

    model.eval()

    with torch.inference_mode():
        for batches in reader:
            for batch in batches:
                batch.to(device)

                seqs, seqs_layout = batch.as_source_input()

                logits, logits_layout = model(seqs, seqs_layout)

                hyps = ctc_greedy_decode(logits, logits_layout.seq_lens_pt, decoder)

                example = batch.example

                for index, utterance_id, ref, hyp in zip(
                    example["indices"], example["ids"], example["transcripts"], hyps  # type: ignore[index]
                ):
                    transcriptions.append(Transcription(index, utterance_id, ref, hyp))

            progress.update(len(transcriptions))

    transcriptions.sort(key=lambda t: t.index)

    return transcriptions


def score(transcriptions: Sequence[Transcription]) -> ErrorRates:
    metric = ErrorRateMetric()

    metric.update(hyps=[t.hypothesis for t in transcriptions], refs=[t.reference for t in transcriptions])

    return metric.compute()


def write_outputs(
    output_dir: Path, split: str, transcriptions: Sequence[Transcription], rates: ErrorRates, summary: dict[str, object]
) -> dict[str, object]:
    """Writes the transcript files and ``{split}.json``. :returns: The json record."""
    output_dir.mkdir(parents=True, exist_ok=True)

    (output_dir / f"{split}.hyp.txt").write_text("".join(f"{t.hypothesis}\n" for t in transcriptions), encoding="utf-8")
    (output_dir / f"{split}.ref.txt").write_text("".join(f"{t.reference}\n" for t in transcriptions), encoding="utf-8")

    rows = ["id\tref\thyp"] + [f"{t.utterance_id}\t{t.reference}\t{t.hypothesis}" for t in transcriptions]

    (output_dir / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def counts(edit_counts: object) -> dict[str, int]:
        return {
            name: getattr(edit_counts, name)
            for name in ("substitutions", "deletions", "insertions", "reference_length")
        }

    record: dict[str, object] = {
        **summary,
        "num_utterances": len(transcriptions),
        "wer": rates.wer,
        "cer": rates.cer,
        "word_edits": counts(rates.word_counts),
        "char_edits": counts(rates.char_counts),
    }

    (output_dir / f"{split}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    resolver = init_fairseq2()

    try:
        device = Device(args.device)

        checkpoint_dir = find_checkpoint_dir(args.model_dir.expanduser().resolve())

        card = checkpoint_card(resolver, checkpoint_dir, args.checkpoint)

        settings = read_finetune_run_settings(checkpoint_dir)

        tokenizer_path = args.tokenizer or settings.tokenizer_path

        tokenizer = load_ctc_tokenizer(tokenizer_path)

        model = load_model(card, device=device, dtype=torch.float32)

        if not isinstance(model, Wav2Vec2AsrModel):
            raise EvalError(f"{checkpoint_dir} holds a {type(model).__name__}, not a wav2vec 2.0 CTC model.")

        check_vocab_size(tokenizer.vocab_info.size, model.final_proj.output_dim, tokenizer_path)

        dataset = AsrManifestDataset(args.manifest_dir.expanduser().resolve())

        transcriptions = transcribe(
            model, tokenizer, dataset, args.split, device, args.max_num_elements, normalize_audio=settings.normalize_audio
        )

        rates = score(transcriptions)
    except (EvalError, DatasetError, OSError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    summary = {
        "split": args.split,
        "checkpoint": str(card.field("checkpoint").as_(str)),
        "tokenizer": str(tokenizer_path),
        "normalize_audio": settings.normalize_audio,
    }

    record = write_outputs(args.output_dir, args.split, transcriptions, rates, summary)

    print(f"{args.split}: WER {rates.wer:.2f} | CER {rates.cer:.2f} | {len(transcriptions)} utterances", file=sys.stderr)

    print(json.dumps(record))

    return 0


if __name__ == "__main__":
    sys.exit(main())
