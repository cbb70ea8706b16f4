from __future__ import annotations

import random

import editdistance
import pytest
import torch

from w2v_knnvq.text.error_rates import (
    EditCounts,
    ErrorRateMetric,
    align,
    char_edits,
    normalize_text,
    word_edits,
)

REF = "THE CAT SAT ON THE MAT"


def test_identical_has_no_edits() -> None:
    assert word_edits(REF, REF) == EditCounts(reference_length=6)
    assert char_edits(REF, REF) == EditCounts(reference_length=22)


def test_substitutions() -> None:
    counts = word_edits(REF, "THE DOG SAT ON A MAT")

    assert counts == EditCounts(substitutions=2, reference_length=6)


def test_deletions() -> None:
    counts = word_edits(REF, "THE CAT ON MAT")

    assert counts == EditCounts(deletions=2, reference_length=6)


def test_insertions() -> None:
    counts = word_edits(REF, "OH THE CAT SAT ON THE FLAT MAT")

    assert counts == EditCounts(insertions=2, reference_length=6)


def test_mixed_edits() -> None:
    # THE->A (S), CAT kept, SAT deleted (D), ON kept, THE kept, MAT->HAT (S), NOW inserted (I)
    counts = word_edits(REF, "A CAT ON THE HAT NOW")

    assert counts == EditCounts(substitutions=2, deletions=1, insertions=1, reference_length=6)
    assert counts.errors == 4


def test_char_edits_count_spaces() -> None:
    # "AB CD" -> "ABCD": the space is deleted; "AB CD" -> "AB XD": one substitution.
    assert char_edits("AB CD", "ABCD") == EditCounts(deletions=1, reference_length=5)
    assert char_edits("AB CD", "AB XD") == EditCounts(substitutions=1, reference_length=5)


def test_kitten_sitting() -> None:
    assert align("KITTEN", "SITTING") == EditCounts(substitutions=2, insertions=1, reference_length=6)


def test_alignment_matches_editdistance_and_lengths() -> None:
    rng = random.Random(0)

    for _ in range(300):
        ref = "".join(rng.choice("AB C") for _ in range(rng.randint(0, 15)))
        hyp = "".join(rng.choice("AB C") for _ in range(rng.randint(0, 15)))

        counts = align(ref, hyp)

        assert counts.errors == editdistance.eval(ref, hyp)
        # Every hypothesis unit is a match, a substitution or an insertion.
        assert counts.reference_length - counts.deletions + counts.insertions == len(hyp)


def test_empty_hypothesis_gives_100_percent() -> None:
    metric = ErrorRateMetric()

    metric.update(hyps=[""], refs=[REF])

    rates = metric.compute()

    assert rates.wer == 100.0
    assert rates.cer == 100.0
    assert rates.word_counts == EditCounts(deletions=6, reference_length=6)


def test_empty_reference_counts_insertions_in_corpus() -> None:
    metric = ErrorRateMetric()

    metric.update(hyps=["A B", "A B C D"], refs=["", "A B C D"])

    rates = metric.compute()

    assert rates.word_counts == EditCounts(insertions=2, reference_length=4)
    assert rates.wer == 50.0


def test_all_empty_references_raise() -> None:
    metric = ErrorRateMetric()

    metric.update(hyps=["A B"], refs=["  "])

    with pytest.raises(ValueError, match="references hold no words"):
        metric.compute()


def test_no_update_raises() -> None:
    with pytest.raises(ValueError, match="undefined"):
        ErrorRateMetric().compute()


def test_corpus_level_aggregation_is_not_a_mean_of_rates() -> None:
    metric = ErrorRateMetric()

    # 1 error in 1 word (100%) and 0 errors in 9 words (0%): corpus WER 10%, not 50%.
    metric.update(hyps=["B"], refs=["A"])
    metric.update(hyps=["A B C D E F G H I"], refs=["A B C D E F G H I"])

    rates = metric.compute()

    assert rates.wer == pytest.approx(10.0)
    # Characters: 1 error in 1 + 17.
    assert rates.cer == pytest.approx(100.0 / 18)


def test_whitespace_is_collapsed_and_case_kept_by_default() -> None:
    metric = ErrorRateMetric()

    metric.update(hyps=["  the   CAT "], refs=["THE CAT"])

    rates = metric.compute()

    assert rates.word_counts == EditCounts(substitutions=1, reference_length=2)
    assert rates.char_counts == EditCounts(substitutions=3, reference_length=7)


def test_lowercase_option_folds_case() -> None:
    metric = ErrorRateMetric(lowercase=True)

    metric.update(hyps=["the cat"], refs=["THE CAT"])

    assert metric.compute().wer == 0.0


def test_without_whitespace_collapse_spaces_are_errors() -> None:
    metric = ErrorRateMetric(collapse_whitespace=False)

    metric.update(hyps=["THE  CAT"], refs=["THE CAT"])

    rates = metric.compute()

    assert rates.wer == 0.0
    assert rates.char_counts == EditCounts(insertions=1, reference_length=7)


def test_normalize_text() -> None:
    assert normalize_text(" A\tb  C\n") == "A b C"
    assert normalize_text(" A b ", lowercase=True) == "a b"
    assert normalize_text(" A  b ", collapse_whitespace=False) == " A  b "


def test_mismatched_batch_raises() -> None:
    with pytest.raises(ValueError, match="same length"):
        ErrorRateMetric().update(hyps=["A"], refs=["A", "B"])

    with pytest.raises(TypeError, match="sequences of strings"):
        ErrorRateMetric().update(hyps="A", refs="A")


def test_merge_state_sums_counts() -> None:
    first = ErrorRateMetric()
    second = ErrorRateMetric()

    first.update(hyps=["A X C"], refs=["A B C"])
    second.update(hyps=["D"], refs=["D E"])

    first.merge_state([second])

    rates = first.compute()

    assert rates.word_counts == EditCounts(substitutions=1, deletions=1, reference_length=5)
    assert rates.wer == pytest.approx(40.0)
    assert rates.as_metric_values() == {"wer": rates.wer, "cer": rates.cer}


def test_reset_clears_counts() -> None:
    metric = ErrorRateMetric()

    metric.update(hyps=["A"], refs=["B"])
    metric.reset()
    metric.update(hyps=["A"], refs=["A"])

    assert metric.compute().wer == 0.0
    assert torch.equal(metric.word_counts, torch.tensor([0, 0, 0, 1]))
