"""Greedy (best path) CTC decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fairseq2.data.tokenizers import TokenDecoder

from w2v_knnvq.text.tokenizer import CTC_BLANK_ID


def ctc_greedy_token_ids(
    logits: Tensor, seq_lens: Tensor | Sequence[int], *, blank_id: int = CTC_BLANK_ID
) -> list[Tensor]:
    """Take the most likely class per frame, merge repeats, then drop blanks.

    :param logits: Per-frame scores, log-probabilities or unnormalized.
        *Shape:* :math:`(N,T,V)`.
    :param seq_lens: The number of valid frames of each sequence. *Shape:* :math:`(N)`.
    :returns: ``N`` token id tensors, each of shape :math:`(S_n)`.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be of shape (N, T, V), but has shape {tuple(logits.shape)}.")

    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int64).cpu()

    batch_size, num_frames, _ = logits.shape

    if seq_lens.shape != (batch_size,):
        raise ValueError(f"`seq_lens` must have shape ({batch_size},), but has shape {tuple(seq_lens.shape)}.")

    if (seq_lens < 0).any() or (seq_lens > num_frames).any():
        raise ValueError(f"`seq_lens` must lie in [0, {num_frames}], but is {seq_lens.tolist()}.")

    # (N, T)
    best = logits.argmax(dim=-1).cpu()

    # A frame starts a new token when it differs from the previous frame; a blank between
    # two equal labels therefore keeps both, as CTC requires.
    is_new = torch.ones_like(best, dtype=torch.bool)

    is_new[:, 1:] = best[:, 1:] != best[:, :-1]

    keep = is_new & (best != blank_id)

    return [best[n, : seq_lens[n]][keep[n, : seq_lens[n]]] for n in range(batch_size)]


def ctc_greedy_decode(
    logits: Tensor,
    seq_lens: Tensor | Sequence[int],
    decoder: TokenDecoder,
    *,
    blank_id: int = CTC_BLANK_ID,
) -> list[str]:
    """Decode ``logits`` greedily to text.

    :param logits: *Shape:* :math:`(N,T,V)`.
    :param seq_lens: *Shape:* :math:`(N)`.
    :param decoder: The tokenizer's decoder (``tokenizer.create_decoder()``).
    :returns: ``N`` transcripts, words separated by single spaces, none at either end.
    """
    return [normalize_transcript(decoder(ids)) for ids in ctc_greedy_token_ids(logits, seq_lens, blank_id=blank_id)]


def normalize_transcript(text: str) -> str:
    """Collapses runs of whitespace (a CTC model may emit word boundaries repeatedly) into
    single spaces and strips both ends."""
    return " ".join(text.split())
