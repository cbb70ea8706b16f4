"""The fairseq2 extension of w2v-knnvq.

fairseq2 runs :func:`setup_w2v_knnvq` at start-up through the entry point
``w2v_knnvq = "w2v_knnvq.extension:setup_w2v_knnvq"`` of the group
``fairseq2.extension``. Set ``FAIRSEQ2_EXTENSION_TRACE=1`` to make a failure
in it raise instead of being logged as a warning.
"""

from __future__ import annotations

from fairseq2.composition import register_package_assets
from fairseq2.runtime.dependency import DependencyContainer

from w2v_knnvq.image import register_image_vqae
from w2v_knnvq.wav2vec2 import register_wav2vec2_knnvq_family


def setup_w2v_knnvq(container: DependencyContainer) -> None:
    """Register the ``wav2vec2_knnvq`` and ``image_vqae`` model families and the asset
    cards of w2v-knnvq."""
    register_wav2vec2_knnvq_family(container)

    register_image_vqae(container)

    register_package_assets(container, "w2v_knnvq.assets")
