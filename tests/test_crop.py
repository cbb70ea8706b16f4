"""The one crop to the start of an utterance: validation reads and the evaluation's loss batch."""

from __future__ import annotations

import torch

from fairseq2.datasets import SequenceBatch

from w2v_knnvq.data.speech_dataset import crop_to_start


def _padded(lengths: list[int]) -> SequenceBatch:
    seqs = torch.zeros(len(lengths), max(lengths))

    for row, length in enumerate(lengths):
        seqs[row, :length] = torch.arange(1, length + 1, dtype=torch.float32)

    return SequenceBatch(seqs, lengths)


def test_each_utterance_keeps_its_first_samples() -> None:
    cropped = crop_to_start(_padded([10, 4, 7]), 6)

    assert cropped is not None
    assert cropped.seq_lens == [6, 4, 6]
    assert cropped.seqs.shape == (3, 6)
    torch.testing.assert_close(cropped.seqs[0], torch.arange(1.0, 7.0))
    torch.testing.assert_close(cropped.seqs[1], torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0]))


def test_short_utterances_are_left_out_and_width_follows_the_longest_kept() -> None:
    cropped = crop_to_start(_padded([3, 5, 2]), 8, min_audio_len=4)

    assert cropped is not None
    assert cropped.seq_lens == [5]
    torch.testing.assert_close(cropped.seqs, torch.arange(1.0, 6.0).unsqueeze(0))

    assert crop_to_start(_padded([3, 2]), 8, min_audio_len=4) is None
