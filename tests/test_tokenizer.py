from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from torch.nn.functional import one_hot

from fairseq2.assets import FileAssetMetadataLoader, StandardAssetStore
from fairseq2.data.tokenizers import Tokenizer
from fairseq2.data.tokenizers.hub import GlobalTokenizerLoader
from fairseq2.runtime.dependency import get_dependency_resolver, wire_object

from tools import train_tokenizer
from w2v_knnvq.text.ctc import ctc_greedy_decode, ctc_greedy_token_ids
from w2v_knnvq.text.tokenizer import (
    CTC_BLANK_ID,
    UNK_ID,
    check_vocab_size,
    load_ctc_tokenizer,
    read_transcripts,
    train_char_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

MINISPEECH_DIR = REPO_ROOT / "tests" / "data" / "minispeech"

# KJV verses in LibriSpeech style, for a tokenizer trained outside the recipe's layout.
SAMPLE_TRANSCRIPTS = [
    "IN THE BEGINNING GOD CREATED THE HEAVEN AND THE EARTH",
    "AND THE EARTH WAS WITHOUT FORM AND VOID AND DARKNESS WAS UPON THE FACE OF THE DEEP",
    "AND GOD SAID LET THERE BE LIGHT AND THERE WAS LIGHT",
    "AND GOD CALLED THE FIRMAMENT HEAVEN AND THE EVENING AND THE MORNING WERE THE SECOND DAY",
    "THOU SHALT NOT TAKE THE NAME OF THE LORD THY GOD IN VAIN",
    "BLESSED ARE THE MEEK FOR THEY SHALL INHERIT THE EARTH",
    "JESUS WEPT",
    "HE'S THE SHEPHERD OF ISRAEL'S FLOCK",
]


def _corpus_transcripts() -> list[str]:
    """Every transcript of the bundled corpus; the tests below round-trip all of them."""
    transcript_files = sorted(MINISPEECH_DIR.rglob("*.trans.txt"))

    assert transcript_files, f"{MINISPEECH_DIR} holds no *.trans.txt files; the bundled corpus is missing."

    num_lines = sum(len(file.read_text(encoding="utf-8").splitlines()) for file in transcript_files)

    transcripts = read_transcripts([MINISPEECH_DIR])

    assert len(transcripts) == num_lines

    return transcripts


@pytest.fixture(scope="module")
def transcripts() -> list[str]:
    return _corpus_transcripts()


@pytest.fixture(scope="module")
def card_path(tmp_path_factory: pytest.TempPathFactory, transcripts: list[str]) -> Path:
    return train_char_tokenizer(transcripts, tmp_path_factory.mktemp("tok"), "test_char")


@pytest.fixture(scope="module")
def tokenizer(card_path: Path) -> Tokenizer:
    return load_ctc_tokenizer(card_path)


def test_read_transcripts_handles_both_formats(tmp_path: Path) -> None:
    chapter = tmp_path / "split" / "19" / "198"
    chapter.mkdir(parents=True)

    (chapter / "19-198.trans.txt").write_text("19-198-0000 IN THE BEGINNING\n19-198-0001\n19-198-0002 AND  THE EARTH\n")
    (tmp_path / "dev.wrd").write_text("JESUS WEPT\n\n HE'S HERE \n")

    assert read_transcripts([tmp_path / "split", tmp_path / "dev.wrd"]) == [
        "IN THE BEGINNING",
        "AND THE EARTH",
        "JESUS WEPT",
        "HE'S HERE",
    ]


def test_read_transcripts_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_transcripts([tmp_path / "missing.wrd"])

    with pytest.raises(FileNotFoundError, match="holds no transcript files"):
        read_transcripts([tmp_path])

    (tmp_path / "notes.txt").write_text("A B\n")

    with pytest.raises(ValueError, match="not a transcript file"):
        read_transcripts([tmp_path / "notes.txt"])

    (tmp_path / "ids.trans.txt").write_text("1-2-0000\n1-2-0001\n")

    with pytest.raises(ValueError, match="No transcript text"):
        read_transcripts([tmp_path / "ids.trans.txt"])


def test_card_names_family_and_model(card_path: Path) -> None:
    card = card_path.read_text()

    assert "name: test_char\n" in card
    assert "tokenizer_family: char_tokenizer\n" in card
    assert "tokenizer: test_char.model\n" in card
    assert card_path.with_suffix(".model").is_file()


def test_vocab_layout(tokenizer: Tokenizer, transcripts: list[str]) -> None:
    distinct_chars = set("".join(transcripts)) - {" "}

    vocab_info = tokenizer.vocab_info

    # Characters, the word boundary, <pad>/blank and <unk>.
    assert vocab_info.size == len(distinct_chars) + 3
    assert vocab_info.pad_idx == CTC_BLANK_ID
    assert vocab_info.unk_idx == UNK_ID
    assert vocab_info.bos_idx is None
    assert vocab_info.eos_idx is None


def test_round_trip_never_uses_blank_or_unk(tokenizer: Tokenizer, transcripts: list[str]) -> None:
    encoder = tokenizer.create_encoder()
    decoder = tokenizer.create_decoder()

    for text in transcripts:
        ids = encoder(text)

        assert ids.dtype == torch.int64
        assert (ids > UNK_ID).all(), text
        assert decoder(ids) == text


def test_unseen_character_maps_to_unk(tokenizer: Tokenizer) -> None:
    ids = tokenizer.create_encoder()("A\u00e9")

    assert UNK_ID in ids.tolist()


def test_model_file_loads_directly(card_path: Path, tokenizer: Tokenizer) -> None:
    direct = load_ctc_tokenizer(card_path.with_suffix(".model"))

    assert direct.vocab_info == tokenizer.vocab_info


def test_card_loads_by_name_from_asset_directory(card_path: Path, tokenizer: Tokenizer) -> None:
    # What `common.assets.extra_paths` does in a recipe: the directory becomes an asset
    # source and `load_tokenizer`'s loader finds the card by name.
    resolver = get_dependency_resolver()

    provider = resolver.resolve(FileAssetMetadataLoader).load(card_path.parent)

    loader = wire_object(resolver, GlobalTokenizerLoader, asset_store=StandardAssetStore([provider]))

    loaded = loader.load("test_char", gangs=None, config=None)

    assert loaded.vocab_info == tokenizer.vocab_info
    assert loaded.create_decoder()(tokenizer.create_encoder()("GOD")) == "GOD"


def test_tokenizer_without_blank_at_zero_is_rejected(tmp_path: Path) -> None:
    model_path = tmp_path / "default_ids.model"

    # SentencePiece's default layout puts <unk> at 0 and has no padding id.
    with model_path.open("wb") as fp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(SAMPLE_TRANSCRIPTS),
            model_writer=fp,
            model_type="char",
            vocab_size=25,
            minloglevel=2,
        )

    with pytest.raises(ValueError, match="does not reserve id 0 for the CTC blank"):
        load_ctc_tokenizer(model_path)


def test_missing_tokenizer_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_tokenizer.py"):
        load_ctc_tokenizer(tmp_path / "none.model")

    with pytest.raises(FileNotFoundError, match=r"train_tokenizer.py"):
        load_ctc_tokenizer(tmp_path / "none.yaml")


def test_train_rejects_bad_name_and_empty_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`name`"):
        train_char_tokenizer(["A B"], tmp_path, "bad name")

    with pytest.raises(ValueError, match="no text"):
        train_char_tokenizer(["", "  "], tmp_path, "empty")


def test_check_vocab_size() -> None:
    check_vocab_size(32, 32, Path("tok.model"))

    with pytest.raises(ValueError, match=r"predicts 30 classes.*tok.model.*of 32.*vocab_size"):
        check_vocab_size(32, 30, Path("tok.model"))


def test_tool_writes_loadable_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrd = tmp_path / "train.wrd"
    wrd.write_text("JESUS WEPT\nHE'S HERE\n")

    tool = train_tokenizer

    assert tool.main([str(wrd), "--output-dir", str(tmp_path / "out"), "--name", "tiny"]) == 0

    # J E S U W P T H ' R + boundary + 2 specials
    assert "vocabulary size 13" in capsys.readouterr().err
    assert load_ctc_tokenizer(tmp_path / "out" / "tiny.yaml").vocab_info.size == 13

    assert tool.main([str(tmp_path / "missing.wrd"), "--output-dir", str(tmp_path)]) == 1
    assert "missing.wrd does not exist" in capsys.readouterr().err


def _frames_to_logits(frames: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Logits whose argmax follows ``frames``, padded with class ``vocab_size - 1``."""
    num_frames = max(len(f) for f in frames)

    padded = [f + [vocab_size - 1] * (num_frames - len(f)) for f in frames]

    # (N, T, V); noise below the margin keeps the argmax where it is put.
    generator = torch.Generator().manual_seed(0)

    noise = torch.rand(len(frames), num_frames, vocab_size, generator=generator)

    return noise + 5.0 * one_hot(torch.tensor(padded), vocab_size).float()


def test_greedy_token_ids_collapse_repeats_and_drop_blanks() -> None:
    frames = [
        [0, 3, 3, 0, 3, 4, 4, 0, 0, 2],  # 3, then blank-separated 3, then 4, 2
        [2, 2, 2],  # a run is one token
        [0, 0, 0, 0],  # blanks only
        [5, 0, 5],  # all padding frames are cut by the length below
    ]
    logits = _frames_to_logits(frames, vocab_size=6)

    ids = ctc_greedy_token_ids(logits, torch.tensor([10, 3, 4, 0]))

    assert [t.tolist() for t in ids] == [[3, 3, 4, 2], [2], [], []]

    # The length cuts frames; trailing frames past it are ignored.
    ids = ctc_greedy_token_ids(logits, [6, 2, 4, 1])

    assert [t.tolist() for t in ids] == [[3, 3, 4], [2], [], [5]]


def test_greedy_token_ids_reject_bad_shapes() -> None:
    logits = torch.zeros(2, 4, 3)

    with pytest.raises(ValueError, match=r"\(N, T, V\)"):
        ctc_greedy_token_ids(torch.zeros(4, 3), [4])

    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ctc_greedy_token_ids(logits, [4])

    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        ctc_greedy_token_ids(logits, [5, 1])


def test_greedy_decode_to_text(tokenizer: Tokenizer, transcripts: list[str]) -> None:
    encoder = tokenizer.create_encoder()

    texts = [transcripts[0], transcripts[-1]]

    frames = []
    for text in texts:
        seq = [CTC_BLANK_ID]
        for token in encoder(text).tolist():
            # Each token spans two frames; a blank follows, which CTC needs between repeats.
            seq += [token, token, CTC_BLANK_ID]

        frames.append(seq)

    logits = _frames_to_logits(frames, tokenizer.vocab_info.size)

    seq_lens = [len(f) for f in frames]

    assert ctc_greedy_decode(logits, seq_lens, tokenizer.create_decoder()) == texts


def test_decoded_text_has_single_spaces_and_no_spaces_at_the_ends(tokenizer: Tokenizer) -> None:
    from w2v_knnvq.text.ctc import normalize_transcript

    assert normalize_transcript("  S  AS    S \t A RISS ") == "S AS S A RISS"

    encoder = tokenizer.create_encoder()

    # SentencePiece starts a text with the word boundary: "IN" is [boundary, I, N].
    boundary, *word = encoder("IN").tolist()

    # A model that emits the boundary before, between and after the words, repeatedly.
    frames = [
        [boundary, CTC_BLANK_ID, boundary, *word, CTC_BLANK_ID, boundary, CTC_BLANK_ID, boundary, *word, boundary]
    ]

    logits = _frames_to_logits(frames, tokenizer.vocab_info.size)

    assert ctc_greedy_decode(logits, [len(frames[0])], tokenizer.create_decoder()) == ["IN IN"]


def test_short_transcripts_train_a_tokenizer(tmp_path: Path) -> None:
    # SentencePiece needs a line limit of at least 10 bytes, longer than every line here.
    card_path = train_char_tokenizer(["AB C", "D"], tmp_path, "short")

    tokenizer = load_ctc_tokenizer(card_path)

    assert tokenizer.create_decoder()(tokenizer.create_encoder()("AB D")) == "AB D"
