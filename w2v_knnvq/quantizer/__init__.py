"""KNN-regularized smoothed vector quantization and the baselines of the paper (torch only)."""

from w2v_knnvq.quantizer.assign import accurate_log_softmax as accurate_log_softmax
from w2v_knnvq.quantizer.assign import cosine_logits as cosine_logits
from w2v_knnvq.quantizer.config import METHOD_NAMES as METHOD_NAMES
from w2v_knnvq.quantizer.config import METHODS as METHODS
from w2v_knnvq.quantizer.config import MethodSpec as MethodSpec
from w2v_knnvq.quantizer.config import QuantizerConfig as QuantizerConfig
from w2v_knnvq.quantizer.estimators import rotation_trick as rotation_trick
from w2v_knnvq.quantizer.estimators import straight_through as straight_through
from w2v_knnvq.quantizer.knn import knn_distances as knn_distances
from w2v_knnvq.quantizer.metrics import CodebookUsage as CodebookUsage
from w2v_knnvq.quantizer.metrics import CodebookUsageReport as CodebookUsageReport
from w2v_knnvq.quantizer.metrics import code_counts as code_counts
from w2v_knnvq.quantizer.metrics import code_perplexity as code_perplexity
from w2v_knnvq.quantizer.metrics import code_usage as code_usage
from w2v_knnvq.quantizer.metrics import distribution_perplexity as distribution_perplexity
from w2v_knnvq.quantizer.metrics import individual_perplexity as individual_perplexity
from w2v_knnvq.quantizer.quantizer import KnnGroup as KnnGroup
from w2v_knnvq.quantizer.quantizer import QuantizerOutput as QuantizerOutput
from w2v_knnvq.quantizer.quantizer import VectorQuantizer as VectorQuantizer
from w2v_knnvq.quantizer.regularizers import KnnLoss as KnnLoss
from w2v_knnvq.quantizer.regularizers import commitment_codebook_loss as commitment_codebook_loss
from w2v_knnvq.quantizer.regularizers import knn_loss as knn_loss
from w2v_knnvq.quantizer.regularizers import perplexity as perplexity
from w2v_knnvq.quantizer.regularizers import perplexity_loss as perplexity_loss
