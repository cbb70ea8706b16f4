"""Exports the encoder of a ``wav2vec2_knnvq`` model to Hugging Face ``transformers``
and torchaudio ``Wav2Vec2Model`` formats."""

from w2v_knnvq.export.encoder import ExportError as ExportError
from w2v_knnvq.export.encoder import describe_encoder as describe_encoder
from w2v_knnvq.export.encoder import encoder_state_dict as encoder_state_dict
from w2v_knnvq.export.huggingface import export_huggingface as export_huggingface
from w2v_knnvq.export.huggingface import huggingface_config as huggingface_config
from w2v_knnvq.export.huggingface import to_huggingface as to_huggingface
from w2v_knnvq.export.torchaudio import TORCHAUDIO_ARGS_FILE as TORCHAUDIO_ARGS_FILE
from w2v_knnvq.export.torchaudio import TORCHAUDIO_STATE_DICT_FILE as TORCHAUDIO_STATE_DICT_FILE
from w2v_knnvq.export.torchaudio import export_torchaudio as export_torchaudio
from w2v_knnvq.export.torchaudio import load_torchaudio_export as load_torchaudio_export
from w2v_knnvq.export.torchaudio import to_torchaudio as to_torchaudio
from w2v_knnvq.export.torchaudio import torchaudio_builder_args as torchaudio_builder_args
