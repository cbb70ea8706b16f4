"""Per-frame features and discrete codes from pretrained ``wav2vec2_knnvq`` models and
fairseq2's ``wav2vec2`` ones (e.g. the ``wav2vec2_base`` card).

.. code:: python

    from w2v_knnvq.features import SpeechFeatureExtractor, load_pretrained_model

    extractor = SpeechFeatureExtractor(load_pretrained_model("OUT_DIR"))
    features = extractor.extract([waveform], sample_rates=22_050, layers=[-1])
    features.codes  # (N, S, G)
"""

from w2v_knnvq.features.audio_input import MODEL_SAMPLE_RATE as MODEL_SAMPLE_RATE
from w2v_knnvq.features.audio_input import AudioInputError as AudioInputError
from w2v_knnvq.features.audio_input import prepare_waveform as prepare_waveform
from w2v_knnvq.features.audio_input import read_audio as read_audio
from w2v_knnvq.features.extractor import PADDING_CODE as PADDING_CODE
from w2v_knnvq.features.extractor import SpeechFeatureExtractor as SpeechFeatureExtractor
from w2v_knnvq.features.extractor import SpeechFeatures as SpeechFeatures
from w2v_knnvq.features.loading import PretrainedModel as PretrainedModel
from w2v_knnvq.features.loading import PretrainedModelError as PretrainedModelError
from w2v_knnvq.features.loading import load_pretrained_model as load_pretrained_model
