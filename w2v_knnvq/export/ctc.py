"""Exports a fine-tuned ``wav2vec2_asr`` CTC model as a Hugging Face ``Wav2Vec2ForCTC``
directory that ``transformers.pipeline("automatic-speech-recognition", model=DIR)`` reads:
the model, a ``Wav2Vec2CTCTokenizer`` and a feature extractor (a ``Wav2Vec2Processor``).

The tokenizer's ``vocab.json`` maps each token of our character tokenizer to its own id,
written as our decoder writes it: the CTC blank (id 0) is ``pad_token``, the word boundary
(SentencePiece's ``▁``, a space) is ``word_delimiter_token`` (``|``, turned back into a
space), and ``<unk>`` is the ``" ⁇ "`` our decoder writes. Greedy decoding in ``transformers``
(best class per frame, repeats merged, blanks dropped) then gives our greedy transcript,
up to whitespace.

The torchaudio export of the same model is :func:`~w2v_knnvq.export.torchaudio.export_torchaudio`
with ``labels=ctc_vocabulary(tokenizer)``: the CTC head becomes its ``aux`` layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fairseq2.data.tokenizers import Tokenizer
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, Wav2Vec2AsrModel

from w2v_knnvq.export.encoder import ExportError
from w2v_knnvq.export.huggingface import (
    encoder_config_kwargs,
    huggingface_encoder_state_dict,
    huggingface_feature_extractor,
    import_transformers,
)
from w2v_knnvq.text.tokenizer import CTC_BLANK_ID
from w2v_knnvq.text.vocabulary import PAD_TOKEN, WORD_DELIMITER_TOKEN, CtcVocabularyError
from w2v_knnvq.text.vocabulary import ctc_vocabulary as written_ctc_vocabulary

if TYPE_CHECKING:
    import transformers

_HF_VOCAB_FILE: Final = "vocab.json"


def ctc_vocabulary(tokenizer: Tokenizer) -> list[str]:
    """:returns: The exported token of each id of ``tokenizer``
        (:func:`w2v_knnvq.text.ctc_vocabulary`).

    :raises ExportError: if the blank is not id 0, a token writes nothing or the same as
        another, or a token writes :data:`WORD_DELIMITER_TOKEN` itself.
    """
    try:
        return written_ctc_vocabulary(tokenizer)
    except CtcVocabularyError as ex:
        raise ExportError(f"{ex} Hugging Face's CTC tokenizer and torchaudio's labels need one.") from None


def huggingface_ctc_tokenizer(tokenizer: Tokenizer, output_dir: Path) -> transformers.Wav2Vec2CTCTokenizer:
    """Writes the ``vocab.json`` of :func:`ctc_vocabulary` to ``output_dir``.

    :returns: The Hugging Face tokenizer that reads it; ``save_pretrained(output_dir)``
        writes its other files.
    """
    transformers = import_transformers()

    vocabulary = ctc_vocabulary(tokenizer)

    output_dir.mkdir(parents=True, exist_ok=True)

    vocab_file = output_dir / _HF_VOCAB_FILE

    vocab_file.write_text(
        json.dumps({token: idx for idx, token in enumerate(vocabulary)}, ensure_ascii=False, indent=2) + "\n",
        encoding="utf-8",
    )

    unk_idx = tokenizer.vocab_info.unk_idx

    return transformers.Wav2Vec2CTCTokenizer(
        str(vocab_file),
        unk_token=None if unk_idx is None else vocabulary[unk_idx],
        pad_token=PAD_TOKEN,
        word_delimiter_token=WORD_DELIMITER_TOKEN,
        bos_token=None,
        eos_token=None,
        # Its default would join a space to the apostrophe that follows it (" 's" -> "'s").
        clean_up_tokenization_spaces=False,
    )


def huggingface_ctc_config(config: Wav2Vec2AsrConfig) -> transformers.Wav2Vec2Config:
    """:returns: The configuration of a ``Wav2Vec2ForCTC`` with the encoder, head size,
        dropout, masking and CTC loss of ``config`` (blank id 0, summed, infinite losses
        zeroed, as fairseq2 computes it).

    :raises ExportError: if the encoder cannot be represented.
    """
    transformers = import_transformers()

    masking = config.use_masking

    return transformers.Wav2Vec2Config(
        **encoder_config_kwargs(config),
        vocab_size=config.target_vocab_size,
        pad_token_id=CTC_BLANK_ID,
        bos_token_id=None,
        eos_token_id=None,
        final_dropout=config.final_dropout_p,
        mask_time_prob=config.max_temporal_mask_prob if masking else 0.0,
        mask_time_min_masks=config.min_num_temporal_mask_spans,
        mask_feature_prob=config.max_spatial_mask_prob if masking else 0.0,
        mask_feature_length=config.spatial_mask_span_len,
        mask_feature_min_masks=config.min_num_spatial_mask_spans,
        ctc_loss_reduction="sum",
        ctc_zero_infinity=True,
    )


def to_huggingface_ctc(model: Wav2Vec2AsrModel, config: Wav2Vec2AsrConfig) -> transformers.Wav2Vec2ForCTC:
    """:returns: A Hugging Face ``Wav2Vec2ForCTC`` in eval mode with the weights of
        ``model``; ``final_proj`` becomes ``lm_head``.

    :raises ExportError: if the encoder cannot be represented.
    """
    transformers = import_transformers()

    hf_model = transformers.Wav2Vec2ForCTC(huggingface_ctc_config(config))

    encoder = huggingface_encoder_state_dict(model, config, hf_model.wav2vec2)

    state_dict = {f"wav2vec2.{key}": value for key, value in encoder.items()}

    source = model.state_dict()

    for name in ("weight", "bias"):
        state_dict[f"lm_head.{name}"] = source[f"final_proj.{name}"].detach().clone()

    hf_model.load_state_dict(state_dict, strict=True)

    return hf_model.eval()


def export_huggingface_ctc(
    model: Wav2Vec2AsrModel, config: Wav2Vec2AsrConfig, tokenizer: Tokenizer, output_dir: Path, *, normalize_audio: bool
) -> Path:
    """Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and the
    tokenizer's files (``vocab.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
    to ``output_dir``; ``transformers.pipeline("automatic-speech-recognition", model=output_dir)``
    transcribes with them.

    :param normalize_audio: Whether the model was fine-tuned on standardized waveforms; the
        feature extractor then standardizes its inputs the same way.

    :returns: ``output_dir``.

    :raises ExportError: if the model or the tokenizer cannot be represented, or the
        tokenizer does not fit the CTC head.
    """
    transformers = import_transformers()

    if tokenizer.vocab_info.size != config.target_vocab_size:
        raise ExportError(
            f"The tokenizer's vocabulary size must equal the CTC head's output size {config.target_vocab_size}, "
            f"but is {tokenizer.vocab_info.size} instead; export with the tokenizer the model was fine-tuned with."
        )

    hf_model = to_huggingface_ctc(model, config)

    hf_tokenizer = huggingface_ctc_tokenizer(tokenizer, output_dir)

    feature_extractor = huggingface_feature_extractor(config, normalize_audio=normalize_audio)

    hf_model.save_pretrained(output_dir, safe_serialization=True)

    processor = transformers.Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=hf_tokenizer)

    processor.save_pretrained(output_dir)

    return output_dir
