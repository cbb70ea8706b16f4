"""Exports of fine-tuned CTC models (and of fairseq2's stock ``wav2vec2`` family) to Hugging
Face ``transformers`` and torchaudio give our logits and our greedy transcripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("FAIRSEQ2_EXTENSION_TRACE", "1")

import pytest
import torch
import yaml
from torch import Tensor

from fairseq2.data.tokenizers import Tokenizer
from fairseq2.models.wav2vec2 import WAV2VEC2_FAMILY, Wav2Vec2EncoderConfig, Wav2Vec2Model, get_wav2vec2_model_hub
from fairseq2.models.wav2vec2.asr import (
    WAV2VEC2_ASR_FAMILY,
    Wav2Vec2AsrConfig,
    Wav2Vec2AsrModel,
    create_wav2vec2_asr_model,
    get_wav2vec2_asr_model_hub,
)
from fairseq2.nn import BatchLayout
from fairseq2.runtime.dependency import get_dependency_resolver

from tests.runs import write_run
from tests.test_export import TOLERANCE
from tools import export_checkpoint
from w2v_knnvq.export import ExportError, ctc_vocabulary, load_torchaudio_export, to_huggingface_ctc
from w2v_knnvq.export.huggingface import huggingface_feature_extractor
from w2v_knnvq.features import read_audio
from w2v_knnvq.runs import find_run_checkpoint
from w2v_knnvq.text import ctc_greedy_decode, load_ctc_tokenizer, read_transcripts, train_char_tokenizer
from w2v_knnvq.text.ctc import normalize_transcript
from w2v_knnvq.wav2vec2 import WAV2VEC2_KNNVQ_ARCHS

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH = REPO_ROOT / "tests" / "data" / "minispeech"

TOKENIZER_NAME = "minispeech_char"

STEP = 3

NUM_WAVEFORMS = 3


def _tiny_encoder_config() -> Wav2Vec2EncoderConfig:
    return WAV2VEC2_KNNVQ_ARCHS["tiny_2x320"]().encoder_config


@pytest.fixture(scope="module")
def waveforms() -> list[Tensor]:
    """The first utterances of the bundled dev split (2-3 s each)."""
    files = sorted((MINISPEECH / "dev").rglob("*.flac"))[:NUM_WAVEFORMS]

    return [read_audio(file)[0] for file in files]


@pytest.fixture(scope="module")
def ctc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Wav2Vec2AsrModel, Tokenizer]:
    """A fine-tuning run of a tiny ``wav2vec2_asr`` model with random weights, and the
    tokenizer trained into its output directory as the recipe does.

    Random weights transcribe garbage, but garbage with every kind of token (letters,
    apostrophes, word boundaries, ``<unk>``); a briefly trained CTC model only emits blanks.
    """
    get_dependency_resolver()

    run_dir = tmp_path_factory.mktemp("finetune")

    card = train_char_tokenizer(read_transcripts([MINISPEECH / "train"]), run_dir / "tokenizer", TOKENIZER_NAME)

    tokenizer = load_ctc_tokenizer(card)

    config = Wav2Vec2AsrConfig(
        encoder_config=_tiny_encoder_config(), target_vocab_size=tokenizer.vocab_info.size, spatial_mask_span_len=16
    )

    torch.manual_seed(0)

    model = create_wav2vec2_asr_model(config).eval()

    recipe_config: dict[str, object] = {
        "model": {"family": WAV2VEC2_ASR_FAMILY, "arch": "base_10h"},
        "tokenizer": {"path": None, "name": TOKENIZER_NAME},
        "dataset": {"normalize_audio": False},
    }

    write_run(run_dir, WAV2VEC2_ASR_FAMILY, config, {STEP: model}, recipe_config=recipe_config)

    # What the ASR evaluation writes (its `evaluation.json`), which the model card reports.
    (run_dir / "eval").mkdir()
    record = {"split": "test", "wer": 12.345, "cer": 4.5, "beam_search": {"wer": 9.0, "cer": 3.25}}
    (run_dir / "eval/evaluation.json").write_text(json.dumps({"run_dir": str(run_dir), "splits": [record]}))

    return run_dir, model, tokenizer


@pytest.fixture(scope="module")
def exported(ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    export_dir = tmp_path_factory.mktemp("exported")

    assert export_checkpoint.main([str(ctc_run[0]), str(export_dir)]) == 0

    return export_dir


@pytest.mark.e2e
def test_the_model_card_reports_the_evaluation(exported: Path) -> None:
    card = (exported / "hf/README.md").read_text()

    assert "automatic-speech-recognition" in card and "with a CTC head" in card
    assert "| test | 12.35 | 4.50 | 9.00 | 3.25 |" in card
    assert "| Transformer | 2 layers of 64 dimensions" in card


def _our_logits(model: Wav2Vec2AsrModel, waveform: Tensor) -> Tensor:
    """:returns: ``(1, T, V)`` the CTC logits of ``waveform``."""
    seqs = waveform[None]

    with torch.inference_mode():
        logits, _ = model(seqs, BatchLayout.of(seqs))

    return logits


def _our_transcript(model: Wav2Vec2AsrModel, tokenizer: Tokenizer, waveform: Tensor) -> str:
    logits = _our_logits(model, waveform)

    [transcript] = ctc_greedy_decode(logits, [logits.shape[1]], tokenizer.create_decoder())

    return transcript


@pytest.mark.e2e
def test_huggingface_ctc_model_gives_our_logits(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], exported: Path, waveforms: list[Tensor]
) -> None:
    hf_dir = exported / "hf"

    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "tokenizer_config.json"} <= {
        path.name for path in hf_dir.iterdir()
    }

    hf_model = transformers.Wav2Vec2ForCTC.from_pretrained(hf_dir).eval()

    assert hf_model.config.pad_token_id == 0 and hf_model.config.vocab_size == ctc_run[2].vocab_info.size

    processor = transformers.AutoProcessor.from_pretrained(hf_dir)

    assert processor.feature_extractor.do_normalize is False  # the run did not standardize its audio

    for waveform in waveforms:
        inputs = processor(waveform.numpy(), sampling_rate=16_000, return_tensors="pt")

        with torch.inference_mode():
            hf_logits = hf_model(inputs.input_values).logits

        ours = _our_logits(ctc_run[1], waveform)

        assert hf_logits.shape == ours.shape
        assert (hf_logits - ours).abs().max() < TOLERANCE


def test_standardizing_feature_extractor_gives_our_logits_of_standardized_audio(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], waveforms: list[Tensor]
) -> None:
    """transformers standardizes with a variance epsilon of 1e-7 and fairseq2 with 1e-5; the
    normalized first CNN layer absorbs the difference in scale."""
    model = ctc_run[1]

    config = get_wav2vec2_asr_model_hub().get_model_config(find_run_checkpoint(ctc_run[0]).card)

    hf_model = to_huggingface_ctc(model, config)

    feature_extractor = huggingface_feature_extractor(config, normalize_audio=True)

    for waveform in waveforms:
        inputs = feature_extractor(waveform.numpy(), sampling_rate=16_000, return_tensors="pt")

        with torch.inference_mode():
            hf_logits = hf_model(inputs.input_values).logits

        ours = _our_logits(model, torch.nn.functional.layer_norm(waveform, waveform.shape))

        assert (hf_logits - ours).abs().max() < TOLERANCE


@pytest.mark.e2e
def test_huggingface_pipeline_transcribes_like_our_greedy_decoding(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], exported: Path, waveforms: list[Tensor]
) -> None:
    _, model, tokenizer = ctc_run

    recognizer = transformers.pipeline("automatic-speech-recognition", model=str(exported / "hf"), device="cpu")

    ours = [_our_transcript(model, tokenizer, waveform) for waveform in waveforms]

    theirs = [recognizer({"raw": waveform.numpy(), "sampling_rate": 16_000})["text"] for waveform in waveforms]

    assert [normalize_transcript(text) for text in theirs] == ours

    # The transcripts exercise every kind of token: word boundaries, apostrophes and `<unk>`.
    assert all(len(transcript) > 20 for transcript in ours), ours

    for symbol in (" ", "'", "\u2047"):
        assert any(symbol in transcript for transcript in ours), (symbol, ours)


@pytest.mark.e2e
def test_huggingface_tokenizer_decodes_like_ours(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], exported: Path
) -> None:
    tokenizer = ctc_run[2]

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "hf")

    vocabulary = ctc_vocabulary(tokenizer)

    assert json.loads((exported / "hf" / "vocab.json").read_text(encoding="utf-8")) == {
        token: idx for idx, token in enumerate(vocabulary)
    }

    assert hf_tokenizer.pad_token_id == 0 and hf_tokenizer.word_delimiter_token == "|"
    assert hf_tokenizer.convert_ids_to_tokens(2) == "|"  # SentencePiece's word boundary
    assert hf_tokenizer.unk_token_id == 1

    size = tokenizer.vocab_info.size

    generator = torch.Generator().manual_seed(0)

    for _ in range(50):
        # Frames of a CTC output: blanks, repeats and word boundaries at any place.
        frames = torch.randint(0, size, (40,), generator=generator)

        frames[torch.rand(40, generator=generator) < 0.3] = 0

        logits = torch.nn.functional.one_hot(frames, size).float()[None]

        [ours] = ctc_greedy_decode(logits, [40], tokenizer.create_decoder())

        assert normalize_transcript(hf_tokenizer.decode(frames.tolist())) == ours


@pytest.mark.e2e
def test_torchaudio_aux_head_gives_our_logits(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], exported: Path, waveforms: list[Tensor]
) -> None:
    ta_dir = exported / "torchaudio"

    builder_args = json.loads((ta_dir / "wav2vec2_model_args.json").read_text())

    assert builder_args["aux_num_out"] == ctc_run[2].vocab_info.size

    labels = json.loads((ta_dir / "labels.json").read_text(encoding="utf-8"))

    assert labels == ctc_vocabulary(ctc_run[2])

    ta_model = load_torchaudio_export(ta_dir)

    for waveform in waveforms:
        with torch.inference_mode():
            ta_logits, _ = ta_model(waveform[None])

        assert (ta_logits - _our_logits(ctc_run[1], waveform)).abs().max() < TOLERANCE


@pytest.mark.e2e
def test_stock_wav2vec2_exports_its_encoder(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer],
    tmp_path: Path,
    waveforms: list[Tensor],
    capsys: pytest.CaptureFixture[str],
) -> None:
    get_dependency_resolver()

    hub = get_wav2vec2_model_hub()

    config = hub.get_arch_config("base")

    config.encoder_config = _tiny_encoder_config()

    torch.manual_seed(1)

    model = hub.create_new_model(config).eval()

    run_dir = tmp_path / "ssl"

    write_run(run_dir, WAV2VEC2_FAMILY, config, {STEP: model}, recipe_config={"dataset": {"normalize_audio": True}})

    export_dir = tmp_path / "exported"

    assert export_checkpoint.main([str(run_dir / "checkpoints"), str(export_dir)]) == 0

    hf_model = transformers.Wav2Vec2Model.from_pretrained(export_dir / "hf").eval()

    assert hf_model.config.num_codevector_groups == config.num_codebooks

    feature_extractor = transformers.AutoFeatureExtractor.from_pretrained(export_dir / "hf")

    assert feature_extractor.do_normalize is True

    ta_model = load_torchaudio_export(export_dir / "torchaudio")

    waveform = waveforms[0]

    ours = _stock_encoder_output(model, waveform)

    with torch.inference_mode():
        hf_output = hf_model(waveform[None]).last_hidden_state

        ta_output, _ = ta_model(waveform[None])

    assert (hf_output - ours).abs().max() < TOLERANCE
    assert (ta_output - ours).abs().max() < TOLERANCE

    # A tokenizer has nothing to go with.
    tokenizer_card = ctc_run[0] / "tokenizer" / f"{TOKENIZER_NAME}.yaml"

    capsys.readouterr()

    assert export_checkpoint.main([str(run_dir), str(tmp_path / "other"), "--tokenizer", str(tokenizer_card)]) == 1

    assert "holds a `wav2vec2` model, which has no CTC head" in capsys.readouterr().err


def _stock_encoder_output(model: Wav2Vec2Model, waveform: Tensor) -> Tensor:
    seqs = waveform[None]

    with torch.inference_mode():
        features, layout, _ = model.encoder_frontend.extract_features(seqs, BatchLayout.of(seqs))

        features, _ = model.encoder_frontend.process_features(features, layout, None)

        return model.encoder(features, layout)


def test_a_tokenizer_that_does_not_fit_is_refused(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = train_char_tokenizer(["ABBA CAB ABC"], tmp_path / "tokenizer", "other")

    tool = export_checkpoint

    assert tool.main([str(ctc_run[0]), str(tmp_path / "exported"), "--tokenizer", str(other)]) == 1

    size = ctc_run[2].vocab_info.size

    assert f"predicts {size} classes, but the tokenizer at {other} has a vocabulary of 6" in capsys.readouterr().err

    assert not (tmp_path / "exported").exists()


@pytest.mark.e2e
def test_a_relative_tokenizer_path_names_the_option(
    ctc_run: tuple[Path, Wav2Vec2AsrModel, Tokenizer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"

    (run_dir / "checkpoints").mkdir(parents=True)

    for name in ("checkpoints/model.yaml", f"checkpoints/step_{STEP}"):
        (run_dir / name).symlink_to(ctc_run[0] / name)

    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"tokenizer": {"path": "tok/minispeech_char.yaml"}, "dataset": {"normalize_audio": False}})
    )

    assert export_checkpoint.main([str(run_dir), str(tmp_path / "exported")]) == 1

    error = capsys.readouterr().err

    assert "relative path tok/minispeech_char.yaml" in error
    assert "`--tokenizer` of tools/export_checkpoint.py" in error


def test_vocabulary_refuses_a_literal_word_delimiter(tmp_path: Path) -> None:
    tokenizer = load_ctc_tokenizer(train_char_tokenizer(["A|B CAB|BA CC"], tmp_path, "pipes"))

    with pytest.raises(ExportError, match=r"is written as '\|' instead"):
        ctc_vocabulary(tokenizer)
