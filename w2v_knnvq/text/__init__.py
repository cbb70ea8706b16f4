"""Text side of ASR: the CTC character tokenizer, greedy and lexicon beam-search CTC
decoding, word n-gram language models and error rates."""

from __future__ import annotations

from w2v_knnvq.text.beam_search import BeamSearchOptions as BeamSearchOptions
from w2v_knnvq.text.beam_search import CtcBeamSearchDecoder as CtcBeamSearchDecoder
from w2v_knnvq.text.beam_search import LanguageModelError as LanguageModelError
from w2v_knnvq.text.beam_search import beam_search_setting_errors as beam_search_setting_errors
from w2v_knnvq.text.ctc import ctc_greedy_decode as ctc_greedy_decode
from w2v_knnvq.text.ctc import ctc_greedy_token_ids as ctc_greedy_token_ids
from w2v_knnvq.text.error_rates import EditCounts as EditCounts
from w2v_knnvq.text.error_rates import ErrorRateMetric as ErrorRateMetric
from w2v_knnvq.text.error_rates import ErrorRates as ErrorRates
from w2v_knnvq.text.error_rates import align as align
from w2v_knnvq.text.error_rates import char_edits as char_edits
from w2v_knnvq.text.error_rates import normalize_text as normalize_text
from w2v_knnvq.text.error_rates import word_edits as word_edits
from w2v_knnvq.text.lexicon import LexiconError as LexiconError
from w2v_knnvq.text.lexicon import LexiconSummary as LexiconSummary
from w2v_knnvq.text.lexicon import check_lexicon as check_lexicon
from w2v_knnvq.text.lexicon import write_lexicon as write_lexicon
from w2v_knnvq.text.ngram import estimate_arpa as estimate_arpa
from w2v_knnvq.text.ngram import write_arpa as write_arpa
from w2v_knnvq.text.tokenizer import CTC_BLANK_ID as CTC_BLANK_ID
from w2v_knnvq.text.tokenizer import DEFAULT_TOKENIZER_NAME as DEFAULT_TOKENIZER_NAME
from w2v_knnvq.text.tokenizer import check_vocab_size as check_vocab_size
from w2v_knnvq.text.tokenizer import finetuning_tokenizer_path as finetuning_tokenizer_path
from w2v_knnvq.text.tokenizer import load_ctc_tokenizer as load_ctc_tokenizer
from w2v_knnvq.text.tokenizer import load_tokenizer_card as load_tokenizer_card
from w2v_knnvq.text.tokenizer import read_transcripts as read_transcripts
from w2v_knnvq.text.tokenizer import train_char_tokenizer as train_char_tokenizer
from w2v_knnvq.text.tokenizer import trained_tokenizer_card as trained_tokenizer_card
from w2v_knnvq.text.vocabulary import PAD_TOKEN as PAD_TOKEN
from w2v_knnvq.text.vocabulary import WORD_DELIMITER_TOKEN as WORD_DELIMITER_TOKEN
from w2v_knnvq.text.vocabulary import CtcVocabularyError as CtcVocabularyError
from w2v_knnvq.text.vocabulary import ctc_vocabulary as ctc_vocabulary
