"""Per-frame features and discrete codes of a pretrained ``wav2vec2_knnvq`` or ``wav2vec2`` model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq2.models.wav2vec2 import GumbelWav2Vec2VectorQuantizer, Wav2Vec2FeatureExtractor
from fairseq2.nn import BatchLayout

from w2v_knnvq.features.audio_input import MODEL_SAMPLE_RATE, AudioInputError, prepare_waveform, read_audio
from w2v_knnvq.features.loading import PretrainedModel
from w2v_knnvq.quantizer import VectorQuantizer
from w2v_knnvq.wav2vec2.frames import PADDING_CODE as PADDING_CODE
from w2v_knnvq.wav2vec2.frames import PretrainingModel, quantize_frames, run_cnn
from w2v_knnvq.wav2vec2.lengths import model_conv_shapes
from w2v_knnvq.wav2vec2.lengths import num_frames as cnn_frames


@dataclass(kw_only=True)
class SpeechFeatures:
    """The features of a batch of N utterances, padded to S frames (50 per second
    for the CNNs of this project). ``F`` is the CNN's ``feature_dim``, ``M`` the
    Transformer's ``model_dim``, ``G`` the number of codebooks. Padding frames
    hold zeros (features) and :data:`PADDING_CODE` (codes)."""

    cnn_features: Tensor
    """``(N, S, F)`` the layer-normed CNN output: what the quantizer quantizes in
    pretraining and what the Transformer's input projection reads."""

    hidden_states: dict[int, Tensor]
    """Layer index (0-based) to its ``(N, S, M)`` output. A pre-norm encoder's
    final layer norm is not applied to them."""

    codes: Tensor
    """``(N, S, G)`` int64 code of every frame in each codebook, assigned by the
    eval-mode (argmax) quantizer to ``cnn_features`` without masking."""

    frame_lengths: Tensor
    """``(N,)`` int64 number of real frames of each utterance."""

    @property
    def padding_mask(self) -> Tensor:
        """``(N, S)`` bool, ``True`` at real frames."""
        num_frames = self.cnn_features.size(1)

        positions = torch.arange(num_frames, device=self.frame_lengths.device)

        return positions.unsqueeze(0) < self.frame_lengths.unsqueeze(1)

    def utterance(self, index: int) -> SpeechFeatures:
        """:returns: The features of utterance ``index`` without padding (N = 1)."""
        length = int(self.frame_lengths[index])

        def trim(tensor: Tensor) -> Tensor:
            return tensor[index : index + 1, :length]

        return SpeechFeatures(
            cnn_features=trim(self.cnn_features),
            hidden_states={layer: trim(states) for layer, states in self.hidden_states.items()},
            codes=trim(self.codes),
            frame_lengths=self.frame_lengths[index : index + 1],
        )


class SpeechFeatureExtractor:
    """Runs a pretrained model without masking, in eval mode, on padded batches.

    A padded batch gives each utterance the features it gets on its own: the
    CNN's group norm, which fairseq2 computes over all time steps (padding
    included), is computed here over the real samples of each utterance only.
    """

    def __init__(self, pretrained: PretrainedModel | PretrainingModel, *, normalize_audio: bool | None = None) -> None:
        """
        :param pretrained: A loaded model (see :func:`load_pretrained_model`) or a bare model.
        :param normalize_audio: Standardize each waveform as pretraining did; by
            default what the pretraining run used (``False`` for a bare model).
        """
        model: PretrainingModel

        if isinstance(pretrained, PretrainedModel):
            model = pretrained.model

            if normalize_audio is None:
                normalize_audio = pretrained.normalize_audio
        else:
            model = pretrained

        if not isinstance(model.encoder_frontend.feature_extractor, Wav2Vec2FeatureExtractor):
            raise ValueError(
                "The model must read waveforms through a `Wav2Vec2FeatureExtractor`; filterbank front ends are not supported."
            )

        self.model = model.eval()

        self.normalize_audio = bool(normalize_audio)

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layers)

    @property
    def codebook_shape(self) -> tuple[int, int]:
        """``(G, V)``: the codebooks of the model's quantizer and the entries of each."""
        quantizer = self.model.quantizer

        if isinstance(quantizer, VectorQuantizer):
            return quantizer.config.num_codebooks, quantizer.config.codebook_size

        if isinstance(quantizer, GumbelWav2Vec2VectorQuantizer):
            return quantizer.num_codebooks, quantizer.num_codebook_entries

        raise TypeError(
            f"The quantizer must be a `VectorQuantizer` or a `GumbelWav2Vec2VectorQuantizer`, but is a `{type(quantizer).__name__}` instead."
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Turns negative indices into 0-based ones; ``None`` means every layer.

        :raises ValueError: on an index outside the encoder.
        """
        if layers is None:
            return list(range(self.num_layers))

        resolved = []

        for layer in layers:
            index = layer + self.num_layers if layer < 0 else layer

            if not 0 <= index < self.num_layers:
                raise ValueError(
                    f"Layer {layer} does not exist; the encoder has layers 0..{self.num_layers - 1} (or -1..-{self.num_layers})."
                )

            if index not in resolved:
                resolved.append(index)

        return sorted(resolved)

    def extract_files(self, paths: Sequence[Path], *, layers: Sequence[int] | None = None) -> SpeechFeatures:
        """Reads ``paths`` with soundfile and extracts their features as one batch.

        :raises AudioInputError: naming the first file that cannot be read.
        """
        waveforms = []
        sample_rates = []

        for path in paths:
            waveform, sample_rate = read_audio(Path(path))

            waveforms.append(waveform)
            sample_rates.append(sample_rate)

        return self.extract(waveforms, sample_rates, layers=layers, sources=[str(path) for path in paths])

    @torch.inference_mode()
    def extract(
        self,
        waveforms: Sequence[Tensor | np.ndarray],
        sample_rates: int | Sequence[int] = MODEL_SAMPLE_RATE,
        *,
        layers: Sequence[int] | None = None,
        sources: Sequence[str] | None = None,
    ) -> SpeechFeatures:
        """
        :param waveforms: N utterances, each ``(S_i,)`` or ``(C, S_i)`` (mixed down), tensors or
            NumPy arrays.
        :param sample_rates: The rate of all utterances or of each; other rates than
            16 kHz are resampled.
        :param layers: Transformer layers whose outputs to return (negative counts
            from the end); ``None`` for all, ``[]`` for none (the Transformer is skipped).
        :param sources: Names used in error messages, e.g. file paths.

        :raises AudioInputError: on an empty, non-finite or too short utterance.
        """
        if not waveforms:
            raise ValueError("`waveforms` must hold at least one utterance.")

        if isinstance(sample_rates, int):
            sample_rates = [sample_rates] * len(waveforms)

        if len(sample_rates) != len(waveforms):
            raise ValueError(f"{len(waveforms)} waveforms but {len(sample_rates)} sample rates were given.")

        if sources is None:
            sources = [f"waveform {idx}" for idx in range(len(waveforms))]

        prepared = [
            prepare_waveform(waveform, rate, source=source)
            for waveform, rate, source in zip(waveforms, sample_rates, sources, strict=True)
        ]

        if self.normalize_audio:
            prepared = [F.layer_norm(waveform, waveform.shape) for waveform in prepared]

        self._check_lengths(prepared, sources)

        seq_lens = [waveform.numel() for waveform in prepared]

        # (N, S_wav)
        seqs = torch.zeros((len(prepared), max(seq_lens)), device=self.device, dtype=self.dtype)

        for row, waveform in zip(seqs, prepared, strict=True):
            row[: waveform.numel()] = waveform.to(row.dtype)

        return self._run(seqs, seq_lens, self.resolve_layers(layers))

    def num_frames(self, num_samples: int) -> int:
        """The number of frames the CNN gives for ``num_samples`` samples at 16 kHz."""
        return cnn_frames(num_samples, model_conv_shapes(self.model))

    def _check_lengths(self, waveforms: list[Tensor], sources: Sequence[str]) -> None:
        for waveform, source in zip(waveforms, sources, strict=True):
            if self.num_frames(waveform.numel()) < 1:
                raise AudioInputError(
                    f"{source}: {waveform.numel()} samples at {MODEL_SAMPLE_RATE} Hz are too short for one frame of the model's CNN; remove it from the input."
                )

    def _run(self, seqs: Tensor, seq_lens: list[int], layers: list[int]) -> SpeechFeatures:
        model = self.model
        frontend = model.encoder_frontend

        cnn = run_cnn(model, seqs, seq_lens)

        codes = quantize_frames(model, cnn).codes

        hidden_states: dict[int, Tensor] = {}

        if layers:
            padding_mask = cnn.padding_mask

            def keep(layer_idx: int, layer_output: Tensor, layer_output_layout: BatchLayout, num_layers: int) -> bool:
                if layer_idx in layers:
                    hidden_states[layer_idx] = layer_output * padding_mask.unsqueeze(-1)

                return True

            layout = BatchLayout.of(cnn.features, cnn.frame_lens)

            encoder_input, _ = frontend.process_features(cnn.features, layout)

            with model.encoder.register_layer_hook(keep):
                model.encoder(encoder_input, layout)

        return SpeechFeatures(
            cnn_features=cnn.features,
            hidden_states=hidden_states,
            codes=codes,
            frame_lengths=torch.tensor(cnn.frame_lens, device=cnn.features.device, dtype=torch.int64),
        )
