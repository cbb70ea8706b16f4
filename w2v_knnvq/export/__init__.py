"""Exports wav2vec 2.0 models to Hugging Face ``transformers`` and torchaudio: the encoder
of a ``wav2vec2_knnvq`` or fairseq2 ``wav2vec2`` model (``Wav2Vec2Model``), and a
fine-tuned ``wav2vec2_asr`` CTC model with its tokenizer (``Wav2Vec2ForCTC``; torchaudio's
``aux`` head)."""

from w2v_knnvq.export.ctc import ctc_vocabulary as ctc_vocabulary
from w2v_knnvq.export.ctc import export_huggingface_ctc as export_huggingface_ctc
from w2v_knnvq.export.ctc import huggingface_ctc_config as huggingface_ctc_config
from w2v_knnvq.export.ctc import huggingface_ctc_tokenizer as huggingface_ctc_tokenizer
from w2v_knnvq.export.ctc import to_huggingface_ctc as to_huggingface_ctc
from w2v_knnvq.export.encoder import EncoderModelConfig as EncoderModelConfig
from w2v_knnvq.export.encoder import ExportError as ExportError
from w2v_knnvq.export.encoder import describe_encoder as describe_encoder
from w2v_knnvq.export.encoder import encoder_state_dict as encoder_state_dict
from w2v_knnvq.export.huggingface import export_huggingface as export_huggingface
from w2v_knnvq.export.huggingface import huggingface_config as huggingface_config
from w2v_knnvq.export.huggingface import to_huggingface as to_huggingface
from w2v_knnvq.export.loading import EXPORT_FORMATS as EXPORT_FORMATS
from w2v_knnvq.export.loading import CtcExportSource as CtcExportSource
from w2v_knnvq.export.loading import EncoderExportSource as EncoderExportSource
from w2v_knnvq.export.loading import ExportFormat as ExportFormat
from w2v_knnvq.export.loading import ExportSource as ExportSource
from w2v_knnvq.export.loading import export_source as export_source
from w2v_knnvq.export.loading import load_export_source as load_export_source
from w2v_knnvq.export.torchaudio import TORCHAUDIO_ARGS_FILE as TORCHAUDIO_ARGS_FILE
from w2v_knnvq.export.torchaudio import TORCHAUDIO_LABELS_FILE as TORCHAUDIO_LABELS_FILE
from w2v_knnvq.export.torchaudio import TORCHAUDIO_STATE_DICT_FILE as TORCHAUDIO_STATE_DICT_FILE
from w2v_knnvq.export.torchaudio import export_torchaudio as export_torchaudio
from w2v_knnvq.export.torchaudio import load_torchaudio_export as load_torchaudio_export
from w2v_knnvq.export.torchaudio import to_torchaudio as to_torchaudio
from w2v_knnvq.export.torchaudio import torchaudio_builder_args as torchaudio_builder_args
from w2v_knnvq.text.vocabulary import PAD_TOKEN as PAD_TOKEN
from w2v_knnvq.text.vocabulary import WORD_DELIMITER_TOKEN as WORD_DELIMITER_TOKEN
