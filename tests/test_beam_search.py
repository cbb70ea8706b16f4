"""Beam-search CTC decoding: the n-gram estimator (through KenLM itself), lexicons, the
search with and without a language model, and the evaluation's command-line options."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import Dictionary

from recipes.wav2vec2_knnvq.asr.eval.decoding import expand_decoding_options
from w2v_knnvq.text import (
    BeamSearchOptions,
    CtcBeamSearchDecoder,
    LanguageModelError,
    LexiconError,
    check_lexicon,
    ctc_vocabulary,
    estimate_arpa,
    load_ctc_tokenizer,
    train_char_tokenizer,
    write_arpa,
    write_lexicon,
)


class _KenLMScorer:
    """Conditional probabilities of an ARPA file as KenLM computes them."""

    def __init__(self, path: Path, words: list[str]) -> None:
        self.words = words
        self.dictionary = Dictionary()

        for word in ["<unk>", *words, "<s>", "</s>"]:
            self.dictionary.add_entry(word)

        self.lm = KenLM(str(path), self.dictionary)

    def prob(self, history: list[str], word: str) -> float:
        state = self._state(history)

        if word == "</s>":
            _, score = self.lm.finish(state)
        else:
            _, score = self.lm.score(state, self.dictionary.get_index(word))

        return float(10.0**score)

    def _state(self, history: list[str]) -> object:
        state = self.lm.start(False)  # after <s>

        for word in history:
            state, _ = self.lm.score(state, self.dictionary.get_index(word))

        return state


def test_ngram_probabilities_match_hand_computed_values(tmp_path: Path) -> None:
    # Predicted unigrams A:2, B:1, </s>:2 (5 in all): n1 = 1, n2 = 2, so D1 = 1/5; the 3
    # seen words leave 0.2 * 3 / 5 = 0.12 to share uniformly over A, B, </s> and <unk>.
    # Bigrams <s>A:2, AB:1, A</s>:1, B</s>:1: n1 = 3, n2 = 1, so D2 = 3/5.
    lm = _KenLMScorer(write_arpa(["A B", "A"], tmp_path / "lm.arpa", order=2), ["A", "B"])

    p_a, p_b, p_end = 1.8 / 5 + 0.03, 0.8 / 5 + 0.03, 1.8 / 5 + 0.03

    # After <s>: seen twice, one distinct continuation, gamma = 0.6 * 1 / 2.
    assert lm.prob([], "A") == pytest.approx(1.4 / 2 + 0.3 * p_a, rel=1e-5)
    assert lm.prob([], "B") == pytest.approx(0.3 * p_b, rel=1e-5)

    # After A: seen twice, two distinct continuations, gamma = 0.6 * 2 / 2.
    assert lm.prob(["A"], "B") == pytest.approx(0.4 / 2 + 0.6 * p_b, rel=1e-5)
    assert lm.prob(["A"], "</s>") == pytest.approx(0.4 / 2 + 0.6 * p_end, rel=1e-5)
    assert lm.prob(["A"], "A") == pytest.approx(0.6 * p_a, rel=1e-5)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ngram_distributions_sum_to_one(tmp_path: Path, order: int) -> None:
    transcripts = ["THE CAT SAT", "THE DOG SAT ON THE CAT", "A CAT", "THE THE DOG", "ON A DOG SAT A CAT"]

    words = sorted({word for line in transcripts for word in line.split()})

    lm = _KenLMScorer(write_arpa(transcripts, tmp_path / "lm.arpa", order=order), words)

    for history in ([], ["THE"], ["THE", "CAT"], ["DOG", "SAT", "ON"], ["SAT", "SAT"], ["A", "DOG"]):
        total = sum(lm.prob(history, word) for word in [*words, "<unk>", "</s>"])

        assert total == pytest.approx(1.0, abs=1e-5), history


def test_ngram_estimator_refuses_unigram_models_and_empty_text() -> None:
    with pytest.raises(ValueError, match="`order` must be at least 2, but is 1 instead"):
        estimate_arpa(["A B"], order=1)

    with pytest.raises(ValueError, match="at least one word"):
        estimate_arpa(["", "  "])


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    card = train_char_tokenizer(["AB BA", "AA BB", "BAB ABA"], tmp_path_factory.mktemp("tokenizer"), "ab")

    vocabulary = ctc_vocabulary(load_ctc_tokenizer(card))

    assert set(vocabulary) == {"<pad>", " ⁇ ", "A", "B", "|"}

    return vocabulary


def _emissions(vocabulary: list[str], frames: list[dict[str, float]]) -> torch.Tensor:
    """Log-probabilities of one utterance: each frame gives some tokens' probabilities, the
    others get 1e-3."""
    index = {token: idx for idx, token in enumerate(vocabulary)}

    probs = torch.full((1, len(frames), len(vocabulary)), 1e-3)

    for t, frame in enumerate(frames):
        for token, prob in frame.items():
            probs[0, t, index[token]] = prob

    return probs.log()


def test_lexicon_spells_words_and_skips_unknown_characters(vocabulary: list[str], tmp_path: Path) -> None:
    summary = write_lexicon(["AB BA AB", "ABC B"], vocabulary, tmp_path / "lexicon.txt")

    assert (tmp_path / "lexicon.txt").read_text() == "AB\tA B\nBA\tB A\nB\tB\n"

    assert summary.num_words == 3
    assert summary.skipped_words == ("ABC",)

    assert check_lexicon(tmp_path / "lexicon.txt", vocabulary) == 3

    with pytest.raises(LexiconError, match="none of which is"):
        write_lexicon(["CD"], vocabulary, tmp_path / "none.txt")


def test_lexicon_with_foreign_tokens_is_refused_naming_the_line(vocabulary: list[str], tmp_path: Path) -> None:
    lexicon = tmp_path / "lexicon.txt"

    lexicon.write_text("AB\tA B |\nCAB\tC A B |\n")

    with pytest.raises(LexiconError, match=r"Line 2 of the lexicon .*lexicon.txt must spell 'CAB'.* uses 'C' instead"):
        check_lexicon(lexicon, vocabulary)

    with pytest.raises(LexiconError, match="does not exist"):
        check_lexicon(tmp_path / "missing.txt", vocabulary)


def test_lexicon_search_only_emits_lexicon_words(vocabulary: list[str], tmp_path: Path) -> None:
    write_lexicon(["AB BA"], vocabulary, tmp_path / "lexicon.txt")

    decoder = CtcBeamSearchDecoder(vocabulary, BeamSearchOptions(lexicon=tmp_path / "lexicon.txt"))

    # Greedy decoding reads "AA", which is no word; the lexicon allows AB (or BA, which
    # would need a B in the first frame).
    frames = [{"|": 0.9}, {"A": 0.9}, {"<pad>": 0.9}, {"A": 0.55, "B": 0.44}]

    assert decoder(_emissions(vocabulary, frames), [4]) == ["AB"]

    # Two words, the delimiter before each as our tokenizer writes it; padding frames
    # beyond the length are ignored.
    frames = [{"|": 0.9}, {"A": 0.9}, {"B": 0.9}, {"|": 0.9}, {"B": 0.9}, {"A": 0.9}, {"A": 0.9}]

    assert decoder(_emissions(vocabulary, frames), torch.tensor([6])) == ["AB BA"]


def test_language_model_outweighs_a_slight_acoustic_preference(vocabulary: list[str], tmp_path: Path) -> None:
    write_lexicon(["AB BA"], vocabulary, tmp_path / "lexicon.txt")

    lm = write_arpa(["AB AB"] * 20 + ["BA"], tmp_path / "lm.arpa", order=2)

    # The second word sounds slightly more like BA than AB.
    frames = [{"|": 0.9}, {"A": 0.9}, {"B": 0.9}, {"|": 0.9}, {"B": 0.5, "A": 0.45}, {"A": 0.5, "B": 0.45}]

    emissions = _emissions(vocabulary, frames)

    def decode(lm_weight: float) -> list[str]:
        options = BeamSearchOptions(lexicon=tmp_path / "lexicon.txt", lm=lm, lm_weight=lm_weight)

        return CtcBeamSearchDecoder(vocabulary, options)(emissions, [len(frames)])

    assert decode(0.0) == ["AB BA"]
    assert decode(2.0) == ["AB AB"]


def test_unusable_language_models_are_refused(vocabulary: list[str], tmp_path: Path) -> None:
    write_lexicon(["AB"], vocabulary, tmp_path / "lexicon.txt")

    with pytest.raises(LanguageModelError, match="does not exist"):
        CtcBeamSearchDecoder(vocabulary, BeamSearchOptions(lexicon=tmp_path / "lexicon.txt", lm=tmp_path / "no.arpa"))

    (tmp_path / "bad.arpa").write_text("not an ARPA file\n")

    with pytest.raises(LanguageModelError, match=r"bad.arpa cannot be loaded"):
        CtcBeamSearchDecoder(vocabulary, BeamSearchOptions(lexicon=tmp_path / "lexicon.txt", lm=tmp_path / "bad.arpa"))

    with pytest.raises(ValueError, match="`beam_size` must be at least 1, but is 0 instead"):
        BeamSearchOptions(lexicon=tmp_path / "lexicon.txt", beam_size=0)

    with pytest.raises(ValueError, match="`lm_weight` must be finite"):
        BeamSearchOptions(lexicon=tmp_path / "lexicon.txt", lm_weight=math.inf)


def test_decoding_options_become_config_overrides() -> None:
    argv = [
        "--no-rich",
        "--lm",
        "lm.arpa",
        "--config",
        "run.run_dir=run",
        "--beam-size=8",
        "--beam-search",
        "--",
        "out",
    ]

    assert expand_decoding_options(argv) == [
        "--no-rich", "--config", "run.run_dir=run",
        "--config", 'decoding.lm="lm.arpa"', "decoding.beam_size=8", "decoding.beam_search=true",
        "--", "out",
    ]  # fmt: skip

    assert expand_decoding_options(["--config", "a=1", "--", "--lm"]) == ["--config", "a=1", "--", "--lm"]

    # Paths stay strings when fairseq2 reads the values as YAML.
    [override] = expand_decoding_options(["--lexicon", "2024"])[1:]

    assert yaml.safe_load(override.split("=", 1)[1]) == "2024"
