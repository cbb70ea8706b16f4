"""Evidence that fine-tuning learns: speech recognition of unseen voices after CPU pretraining.

In about twenty minutes on two CPU cores, this job

1. synthesizes an hour of read speech with ``tools/synthesize_corpus.py`` (sixteen voices of
   three offline TTS engines; twelve train, two dev and two test voices held out);
2. pretrains the small ``wav2vec2_knnvq`` model (``--arch``) with ``softmax-knn-ce`` on the
   training audio;
3. fine-tunes it for CTC on the training transcripts (no dropout, speed perturbation), and,
   with the same budget, the same architecture from random initialization
   (``pretrained_encoder.load_weights=false``);
4. estimates a word trigram from the corpus's ``lm_text.txt`` (every KJV verse except those
   of the dev and test splits; the training transcripts for a corpus without one);
5. evaluates both runs on the held-out dev and test voices, with greedy decoding and with
   beam search over the language model's words and the trigram, and prints a table of CER
   and WER, also written to ``OUTPUT_DIR/report.md``.

Every stage resumes or skips what is already done, so a rerun only finishes what is missing::

    w2v-knnvq-asr-demo [--output-dir outputs/asr_demo] [--arch ARCH]
        [--pretrain-steps N] [--finetune-steps N] [--corpus-dir DIR]

The corpus needs the TTS engines (``tools/bootstrap.sh`` installs them as root).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from w2v_knnvq.data.manifest import ManifestConfig, make_manifest
from w2v_knnvq.files import write_atomically
from w2v_knnvq.runs import find_run_checkpoint
from w2v_knnvq.text import (
    ctc_vocabulary,
    finetuning_tokenizer_path,
    load_ctc_tokenizer,
    read_transcripts,
    write_arpa,
    write_lexicon,
)
from w2v_knnvq.tool import tool_parser

from .jobs import REPO_ROOT, Job, JobError, evaluation_job, read_split_records, recipe_module, run_jobs, threads_per_job
from .pretraining import PRESET as SSL_PRESET
from .pretraining import pretrain_command

ASR_PRESET = Path(__file__).resolve().parents[1] / "wav2vec2_knnvq" / "asr" / "configs" / "tiny_cpu.yaml"
SYNTHESIZER = REPO_ROOT / "tools" / "synthesize_corpus.py"

CORPUS_OPTIONS = (
    "--seed", "0", "--train-utterances", "1050", "--dev-utterances", "80", "--test-utterances", "80",
    "--min-words", "4", "--max-words", "16", "--max-seconds", "7",
)  # fmt: skip
"""About 62 minutes of training audio and 5 minutes for each held-out split."""

METHOD = "softmax-knn-ce"

DEFAULT_ARCH = "small_2x320"

SPEED_FACTORS = (0.9, 1.0, 1.1)
"""Speed perturbation of the fine-tuning's training utterances."""

LM_TEXT_FILE = "lm_text.txt"
"""The language-model text of a synthesized corpus (``tools/synthesize_corpus.py``)."""

LM_ORDER = 3

LM_WEIGHT, WORD_SCORE = 1.0, 2.0
"""The best dev WER of (lm_weight, word_score) = (0.5, 1), (1, 2) and (2, 4), tried on a
3,000-step fine-tuning of the ``tiny`` arch on the default corpus."""


@dataclass(frozen=True, kw_only=True)
class FinetuneRun:
    name: str

    load_weights: bool

    label: str


RUNS = (
    FinetuneRun(name="finetune_pretrained", load_weights=True, label="pretrained (softmax-knn-ce)"),
    FinetuneRun(name="finetune_random_init", load_weights=False, label="random initialization"),
)


def synthesize_corpus(corpus_dir: Path) -> None:
    """Runs the synthesizer unless ``corpus_dir`` holds a finished corpus."""
    if (corpus_dir / "SPEAKERS.txt").is_file():
        print(f"== Corpus: {corpus_dir} (already there)", flush=True)

        return

    print(f"== Synthesizing the corpus -> {corpus_dir}", flush=True)

    command = [sys.executable, str(SYNTHESIZER), "--output-dir", str(corpus_dir), *CORPUS_OPTIONS]

    # Its progress goes to the terminal: the synthesis is the longest stage of a first run.
    returncode = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode

    if returncode != 0:
        raise JobError(f"The corpus synthesis failed with exit status {returncode}; rerun to finish it.")


def write_manifests(corpus_dir: Path, manifest_dir: Path) -> None:
    for split in ("train", "dev", "test"):
        make_manifest(
            ManifestConfig(corpus_dir=corpus_dir, splits=[split], output_dir=manifest_dir, show_progress=False)
        )


def finetune_command(
    run: FinetuneRun, run_dir: Path, pretrained_dir: Path, manifest_dir: Path, num_steps: int, num_threads: int
) -> tuple[str, ...]:
    """The ASR recipe's tiny preset with the CNN trained too, at a higher learning rate than
    the preset's short smoke run, without dropout and with speed perturbation."""
    validate_every = max(1, num_steps // 4)

    publish_every = 10 if validate_every % 10 == 0 else 1

    # Lighter masking than the preset's fairseq2 defaults (69% of the frames, 55% of the
    # channels), which slow a small model down on an hour of audio; a span of 8 channels
    # leaves two spans in its 64.
    masking = (
        "model.config_overrides.max_temporal_mask_prob=0.3",
        "model.config_overrides.min_num_temporal_mask_spans=1",
        "model.config_overrides.max_spatial_mask_prob=0.3",
        "model.config_overrides.spatial_mask_span_len=8",
    )

    # A model this small underfits an hour of speech: dropout only slows it down, and the
    # CNN learns at the full rate (fairseq2 scales its gradient by 0.1 by default). Speed
    # perturbation stands in for the voices the corpus does not have.
    regularization = (
        "model.config_overrides.final_dropout_p=0.0",
        *(
            f"model.config_overrides.encoder_config.{name}=0.0"
            for name in ("dropout_p", "attn_dropout_p", "ffn_inner_dropout_p")
        ),
        "model.config_overrides.encoder_config.feature_grad_scale=1.0",
        f"dataset.speed_perturbation=[{','.join(str(factor) for factor in SPEED_FACTORS)}]",
    )

    return (
        sys.executable, "-m", recipe_module("wav2vec2_knnvq.asr"), "--no-rich", "--config-file", str(ASR_PRESET), "--config",
        f"pretrained_encoder.path={pretrained_dir}",
        f"pretrained_encoder.load_weights={str(run.load_weights).lower()}",
        f"dataset.config_overrides.manifest_dir={manifest_dir}",
        "dataset.train_split=train",
        "dataset.valid_split=dev",
        "tokenizer.name=synthetic_char",
        f"regime.num_steps={num_steps}",
        f"regime.validate_every_n_steps={validate_every}",
        f"regime.checkpoint_every_n_steps={validate_every}",
        f"regime.publish_metrics_every_n_steps={publish_every}",
        "finetune.freeze_feature_extractor=false",
        "finetune.freeze_encoder_steps=100",
        "optimizer.config.lr=0.003",
        *masking,
        *regularization,
        f"common.torch.num_threads={num_threads}",
        "--", str(run_dir),
    )  # fmt: skip


def write_language_model(corpus_dir: Path, manifest_dir: Path, lm_dir: Path) -> tuple[Path, list[str]]:
    """Writes the trigram of the corpus's language-model text (the training transcripts if
    it has none) to ``lm_dir/lm.arpa``; returns it and the text's lines."""
    lm_text = corpus_dir / LM_TEXT_FILE

    if lm_text.is_file():
        lines = [line for line in lm_text.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        lm_text = manifest_dir / "train.wrd"

        lines = read_transcripts([lm_text])

    lm_file = lm_dir / "lm.arpa"

    if not lm_file.is_file():
        print(f"== Estimating a word {LM_ORDER}-gram of {lm_text} ({len(lines)} lines) -> {lm_file}", flush=True)

        lm_dir.mkdir(parents=True, exist_ok=True)

        write_atomically(lm_file, lambda tmp_path: write_arpa(lines, tmp_path, order=LM_ORDER))

    return lm_file, lines


def write_run_lexicon(run_dir: Path, lines: Sequence[str]) -> Path:
    """The lexicon of the words of ``lines`` spelled with the tokens of the run's tokenizer."""
    run = find_run_checkpoint(run_dir)

    tokenizer = load_ctc_tokenizer(finetuning_tokenizer_path(run, relative_path_fix="rerun the fine-tuning"))

    return write_lexicon(lines, ctc_vocabulary(tokenizer), run_dir / "lexicon.txt").file


EVAL_SPLITS = ("test", "dev")


def evaluate_all(
    finetuning: Sequence[Job], manifest_dir: Path, lm_file: Path, lm_lines: Sequence[str]
) -> list[dict[str, dict[str, Any]]]:
    """Greedy and beam-search decoding of the test and dev splits with each run's best
    checkpoint, one evaluation of both splits per run, into ``{run}/eval``.

    :returns: The record of each split (of its ``evaluation.json``), for each run in order.
    :raises JobError: if an evaluation fails.
    """
    jobs = []

    for run in finetuning:
        lexicon = write_run_lexicon(run.output_dir, lm_lines)

        options = (
            "--lm", str(lm_file), "--lexicon", str(lexicon), "--lm-weight", str(LM_WEIGHT), "--word-score", str(WORD_SCORE),
        )  # fmt: skip

        overrides = (f"dataset.config_overrides.manifest_dir={manifest_dir}", f"dataset.splits=[{','.join(EVAL_SPLITS)}]")  # fmt: skip

        name = f"Evaluating {run.output_dir.name} on {' and '.join(EVAL_SPLITS)}"

        jobs.append(evaluation_job(run, "wav2vec2_knnvq.asr.eval", overrides, name=name, options=options))

    run_jobs(jobs)

    return [read_split_records(job, EVAL_SPLITS) for job in jobs]


def report_table(
    rows: Sequence[tuple[FinetuneRun, Mapping[str, Any], Mapping[str, Any]]], num_steps: int, arch: str
) -> str:
    """The Markdown table of CER and WER, one row of ``(run, test record, dev record)`` per run."""
    lines = [
        f"CTC fine-tuning of the `{arch}` encoder, {num_steps} steps each; dev and test voices are not in "
        f"the training data. Greedy decoding, and beam search with a word {LM_ORDER}-gram (LM; "
        f"lm_weight {LM_WEIGHT}, word_score {WORD_SCORE}).",
        "",
        "| encoder initialization | test CER | test WER | test CER, LM | test WER, LM "
        "| dev CER | dev WER | dev CER, LM | dev WER, LM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    for run, test, dev in rows:
        values = [
            split[key] if key in ("cer", "wer") else split["beam_search"][key[3:]]
            for split in (test, dev)
            for key in ("cer", "wer", "lm_cer", "lm_wer")
        ]

        lines.append(f"| {run.label} | {' | '.join(f'{value:.1f}' for value in values)} |")

    return "\n".join(lines)


def run_asr_demo(output_dir: Path, corpus_dir: Path | None, arch: str, pretrain_steps: int, finetune_steps: int) -> str:
    """Every stage of the job; returns the table also written to ``output_dir/report.md``.

    :raises JobError: if a stage fails.
    """
    manifest_dir, pretrained_dir = output_dir / "manifests", output_dir / "pretrain"

    if corpus_dir is None:
        corpus_dir = output_dir / "corpus"

        synthesize_corpus(corpus_dir)
    else:
        corpus_dir = corpus_dir.resolve()

    write_manifests(corpus_dir, manifest_dir)

    ssl_overrides = (f"model.arch={arch}", "dataset.valid_split=dev", f"dataset.config_overrides.manifest_dir={manifest_dir}")  # fmt: skip

    pretraining = Job(
        name=f"Pretraining with {METHOD} ({pretrain_steps} steps)",
        command=pretrain_command(
            METHOD, pretrained_dir, pretrain_steps, threads_per_job(1, 1), ssl_overrides, preset=SSL_PRESET
        ),
        output_dir=pretrained_dir,
        log_file=pretrained_dir / "pretrain.log",
    )

    run_jobs([pretraining])

    num_threads = threads_per_job(len(RUNS), len(RUNS))

    finetuning = [
        Job(
            name=f"Fine-tuning {run.name} ({finetune_steps} steps)",
            command=finetune_command(
                run, output_dir / run.name, pretrained_dir, manifest_dir, finetune_steps, num_threads
            ),
            output_dir=output_dir / run.name,
            log_file=output_dir / run.name / "finetune.log",
            after=(pretraining,),
        )
        for run in RUNS
    ]

    run_jobs(finetuning, parallel=len(RUNS))

    lm_file, lm_lines = write_language_model(corpus_dir, manifest_dir, output_dir / "lm")

    evaluations = evaluate_all(finetuning, manifest_dir, lm_file, lm_lines)

    rows = [(run, records["test"], records["dev"]) for run, records in zip(RUNS, evaluations, strict=True)]

    table = report_table(rows, finetune_steps, arch)

    (output_dir / "report.md").write_text(table + "\n", encoding="utf-8")

    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = tool_parser(__doc__, prog="w2v-knnvq-asr-demo")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "asr_demo")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="the wav2vec2_knnvq architecture (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=3000)
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        help="an existing corpus in the LibriSpeech layout with train/dev/test (default: synthesize one)",
    )
    args = parser.parse_args(argv)

    output_dir: Path = args.output_dir.resolve()

    start = time.monotonic()

    try:
        table = run_asr_demo(output_dir, args.corpus_dir, args.arch, args.pretrain_steps, args.finetune_steps)
    except JobError as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(f"\n{table}\n\nTranscripts: {output_dir}/<run>/eval/test.tsv  ({time.monotonic() - start:.0f} s in all)")

    return 0


if __name__ == "__main__":
    sys.exit(main())
