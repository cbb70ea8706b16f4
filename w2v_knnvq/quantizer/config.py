"""Quantizer configuration and the paper's method names."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Final, Literal

Assignment = Literal["nearest", "softmax", "gumbel-soft", "gumbel-hard"]
Distance = Literal["euclidean", "cosine"]
Estimator = Literal["ste", "rotation"]
Regularizer = Literal["commitment", "perplexity", "knn"]
KnnMetric = Literal["ce", "l2"]
KnnScope = Literal["global", "rank"]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """The combination of components that one method name stands for."""

    assignment: Assignment
    """``nearest``: hard nearest-neighbour quantization with a gradient estimator
    (section 2.1); the others smooth the onehot vector (section 2.2, eq. 7-8)."""

    regularizer: Regularizer

    distance: Distance = "cosine"
    """Nearest-neighbour distance of hard quantizers; smoothed ones are always cosine (A.1)."""

    estimator: Estimator | None = None

    knn_metric: KnnMetric | None = None

    simvq: bool = False
    """Reparameterize the codebook as a frozen random matrix times a learnable one."""

    @property
    def smoothed(self) -> bool:
        return self.assignment != "nearest"


METHODS: Final[dict[str, MethodSpec]] = {
    "ste-euclid": MethodSpec(assignment="nearest", distance="euclidean", estimator="ste", regularizer="commitment"),
    "ste-cosine": MethodSpec(assignment="nearest", distance="cosine", estimator="ste", regularizer="commitment"),
    "simvq": MethodSpec(
        assignment="nearest",
        distance="euclidean",
        estimator="ste",
        regularizer="commitment",
        simvq=True,
    ),
    "re-euclid": MethodSpec(assignment="nearest", distance="euclidean", estimator="rotation", regularizer="commitment"),
    "re-cosine": MethodSpec(assignment="nearest", distance="cosine", estimator="rotation", regularizer="commitment"),
    "hg-ppl": MethodSpec(assignment="gumbel-hard", regularizer="perplexity"),
    "hg-knn-ce": MethodSpec(assignment="gumbel-hard", regularizer="knn", knn_metric="ce"),
    "hg-knn-l2": MethodSpec(assignment="gumbel-hard", regularizer="knn", knn_metric="l2"),
    "sg-ppl": MethodSpec(assignment="gumbel-soft", regularizer="perplexity"),
    "sg-knn-ce": MethodSpec(assignment="gumbel-soft", regularizer="knn", knn_metric="ce"),
    "sg-knn-l2": MethodSpec(assignment="gumbel-soft", regularizer="knn", knn_metric="l2"),
    "softmax-ppl": MethodSpec(assignment="softmax", regularizer="perplexity"),
    "softmax-knn-l2": MethodSpec(assignment="softmax", regularizer="knn", knn_metric="l2"),
    "softmax-knn-ce": MethodSpec(assignment="softmax", regularizer="knn", knn_metric="ce"),
}

METHOD_NAMES: Final[tuple[str, ...]] = tuple(METHODS)


@dataclass(kw_only=True)
class QuantizerConfig:
    """Holds the configuration of a :class:`VectorQuantizer`.

    ``method`` is a plain field naming one row of the paper's Tables 1 and 3, so that one
    override (``quantizer.method=softmax-ppl``) switches the whole combination.
    """

    method: str = "softmax-knn-ce"
    """One of :data:`METHOD_NAMES`."""

    input_dim: int | None = None
    """Dimensionality of the input vectors. A learned linear projection maps them to
    ``num_codebooks * codebook_dim`` when the two differ. ``None`` leaves it to the model
    that owns the quantizer (the ``wav2vec2_knnvq`` family takes its CNN's
    ``feature_dim``); a :class:`VectorQuantizer` needs it set."""

    num_codebooks: int = 1
    """G, the number of codebooks of product quantization; the input is split into G groups."""

    codebook_size: int = 1024
    """M, the number of entries of each codebook."""

    codebook_dim: int = 256
    """Dimensionality of each codebook vector."""

    knn_k: int = 1
    """K, the number of batch neighbours pulled toward each simplex vertex (eq. 13). With
    ``knn_scope="global"`` it is K over the union of all data-parallel ranks' batches, whatever
    their number; with ``"rank"`` it is K per rank, so R ranks pull R x K samples per vertex in
    total (the paper's 4 GPUs with K = 2 pulled 8)."""

    knn_scope: KnnScope = "global"
    """``global``: eq. 13 exactly over the union of the data-parallel ranks' samples (each rank
    all-gathers the others' top-K candidate scores; one process is the same as ``rank``).
    ``rank``: each rank takes the K nearest of its own samples, the paper's implementation
    (section 5.3). Eval mode always selects per rank and runs no collective."""

    knn_vertex_fraction: float = 1.0
    """Each training step regularizes a fresh uniformly random subset of
    ``ceil(fraction x M)`` vertices per codebook, normalized by the subset's size, so that the
    expected loss is eq. 13 (section 5.3's suggestion). 1.0 takes every vertex."""

    chunk_size: int | None = None
    """Smoothed methods compute logits, softmax, ``Q^T p``, the KNN candidates and the
    perplexities this many vectors at a time, forward and backward (recomputed: one more
    matrix product), so that no ``(N, G, M)`` tensor is held; ``QuantizerOutput.probs``,
    ``logits`` and ``log_probs`` are then ``None``. Hard methods search their nearest
    neighbours in chunks. ``None`` computes densely and keeps the probabilities for backward."""

    straight_through_codebook: bool = False
    """Straight-through methods (``ste-*``, ``simvq``): with ``True``, eq. 2 literally,
    ``q + z - detach(z)``, so the main loss also reaches the chosen codebook entry. With
    ``False`` (the default and every preset's choice: the VQ-VAE convention of the baselines the
    paper follows), ``detach(q) + z - detach(z)``: the codebook learns from the codebook loss
    (eq. 10) alone."""

    commitment_beta: float = 1.0
    """beta, the weight of the commitment loss (eq. 10, Appendix A.2)."""

    init_temperature: float = 0.1
    """Initial value of the learnable temperature t that divides the cosine logits (A.1)."""

    min_temperature: float = 1e-3
    """Floor of t (``t = min_temperature + exp(w)`` for a learned w), which bounds the logits
    by 1/min_temperature."""

    gumbel_tau: float = 1.0
    """Gumbel-softmax temperature tau of eq. 7, fixed unless ``gumbel_tau_anneal`` is set."""

    gumbel_tau_anneal: tuple[float, float, float] | None = None
    """(max, min, decay): wav2vec 2.0's schedule tau = max(max * decay^step, min), e.g.
    (2.0, 0.5, 0.999995)."""

    def errors(self) -> list[str]:
        """What makes this configuration unusable, one sentence per setting; empty if nothing.

        The one check of a quantizer configuration. The core knows nothing of fairseq2, so the
        model families report these in their configuration's ``validate()`` (fairseq2 then
        names the section, and their factories validate a configuration built in code once,
        before any module is built); :meth:`from_method` raises the first. Modules do not
        validate what they are built from.
        """
        errors = []

        if self.method not in METHODS:
            errors.append(f"`method` must be one of {', '.join(METHOD_NAMES)}, but is '{self.method}' instead.")

        if self.input_dim is not None and self.input_dim < 1:
            errors.append(f"`input_dim` must be at least 1, but is {self.input_dim} instead.")

        if self.knn_scope not in ("global", "rank"):
            errors.append(f"`knn_scope` must be 'global' or 'rank', but is '{self.knn_scope}' instead.")

        if not 0.0 < self.knn_vertex_fraction <= 1.0:
            errors.append(f"`knn_vertex_fraction` must be in (0, 1], but is {self.knn_vertex_fraction} instead.")

        if self.chunk_size is not None and self.chunk_size < 1:
            errors.append(f"`chunk_size` must be at least 1 or `None`, but is {self.chunk_size} instead.")

        for name in ("num_codebooks", "codebook_dim", "knn_k"):
            if getattr(self, name) < 1:
                errors.append(f"`{name}` must be at least 1, but is {getattr(self, name)} instead.")

        if self.codebook_size < 2:
            # One code quantizes every frame to the same vector: wav2vec 2.0's contrastive
            # task and an autoencoder's codes then carry nothing, yet train without a word.
            errors.append(
                f"`codebook_size` must be at least 2 for the codes to tell frames apart, but is {self.codebook_size} instead."
            )

        if not 0.0 < self.min_temperature < self.init_temperature:
            errors.append(
                "`init_temperature` must exceed `min_temperature` > 0, but they are "
                f"{self.init_temperature} and {self.min_temperature} instead."
            )

        if self.gumbel_tau <= 0.0:
            errors.append(f"`gumbel_tau` must be positive, but is {self.gumbel_tau} instead.")

        if self.gumbel_tau_anneal is not None:
            max_tau, min_tau, decay = self.gumbel_tau_anneal
            if not (0.0 < min_tau <= max_tau and 0.0 < decay <= 1.0):
                errors.append(
                    "`gumbel_tau_anneal` must be (max, min, decay) with 0 < min <= max and "
                    f"0 < decay <= 1, but is {self.gumbel_tau_anneal} instead."
                )

        return errors

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def output_dim(self) -> int:
        return self.num_codebooks * self.codebook_dim

    @classmethod
    def from_method(
        cls,
        name: str,
        *,
        input_dim: int,
        num_codebooks: int,
        codebook_size: int,
        codebook_dim: int,
        **overrides: Any,
    ) -> QuantizerConfig:
        """Build the configuration of the method ``name`` with the given shapes.

        :param overrides: Any other field of :class:`QuantizerConfig` (``knn_k``, ...).
        """
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"Unknown quantizer options: {', '.join(sorted(unknown))}.")

        config = cls(
            method=name,
            input_dim=input_dim,
            num_codebooks=num_codebooks,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
        )

        config = replace(config, **overrides)

        errors = config.errors()

        if errors:
            raise ValueError(errors[0])

        return config
