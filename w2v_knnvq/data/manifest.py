"""Fairseq-style manifests for speech corpora in the LibriSpeech layout.

A LibriSpeech split is ``SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac`` with one
``SPEAKER-CHAPTER.trans.txt`` per chapter whose lines are ``SPEAKER-CHAPTER-NNNN TRANSCRIPT``.

A manifest is two files that share a name:

- ``{name}.tsv``: the absolute audio root on the first line, then one
  ``RELATIVE/PATH.flac<TAB>NUM_SAMPLES`` line per utterance;
- ``{name}.wrd``: the transcript of each utterance, one line per manifest entry, same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from w2v_knnvq.data.audio_check import SAMPLE_RATE, AudioFileError, inspect_audio
from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.files import write_lines_atomically

LIBRISPEECH_SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
"""The splits of the LibriSpeech release; any other split folder in the same layout works too."""

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A corpus or manifest that cannot be read or written; the message names the path."""


@dataclass(frozen=True, kw_only=True)
class BadFile:
    """A file that cannot go into a manifest."""

    path: Path

    reason: str
    """Why, and how to fix it."""


class BadFilesError(ManifestError):
    """Raised instead of writing a manifest that would contain bad files."""

    bad_files: list[BadFile]

    def __init__(self, bad_files: list[BadFile]) -> None:
        listing = "\n".join(f"  {bad.path}: {bad.reason}" for bad in bad_files)

        super().__init__(
            f"{len(bad_files)} bad file(s), no manifest written; fix or remove them, "
            f"or skip them with `skip_bad=True` (`--skip-bad`):\n{listing}"
        )

        self.bad_files = bad_files


@dataclass(frozen=True, kw_only=True)
class CorpusUtterance:
    """One utterance of a manifest."""

    rel_path: str
    """The audio file, relative to the manifest's audio root, with ``/`` separators."""

    num_samples: int

    transcript: str


@dataclass(kw_only=True)
class CorpusScan:
    """The usable utterances of one or more splits, and the files that are not usable."""

    audio_root: Path
    """Absolute directory that ``CorpusUtterance.rel_path`` is relative to."""

    entries: list[CorpusUtterance]
    """Sorted by ``rel_path``."""

    bad_files: list[BadFile]
    """Sorted by path."""


@dataclass(frozen=True, kw_only=True)
class ManifestFiles:
    tsv_path: Path

    wrd_path: Path

    num_entries: int


@dataclass(kw_only=True)
class ManifestConfig:
    corpus_dir: Path
    """The folder that holds the split folders (e.g. ``LibriSpeech``)."""

    splits: Sequence[str]
    """Split folders combined into one manifest, e.g. all three LibriSpeech training splits."""

    output_dir: Path

    name: str | None = None
    """Base name of the ``.tsv``/``.wrd`` pair; defaults to the split name if there is only one."""

    sample_rate: int = SAMPLE_RATE

    skip_bad: bool = False
    """Leave bad files out with a warning instead of refusing to write the manifest."""

    full_decode: bool = False
    """Decode every sample of every file instead of only the end of each file."""

    num_workers: int = 4
    """Threads that check audio files; decoding releases the GIL."""

    show_progress: bool = True
    """Report progress on stderr."""


def make_manifest(config: ManifestConfig) -> ManifestFiles:
    """Scans ``config.splits`` of ``config.corpus_dir``; writes ``{name}.tsv`` and ``{name}.wrd``.

    :raises ManifestError: if a folder is missing or a split is empty.
    :raises BadFilesError: if a file is bad and ``config.skip_bad`` is not set; nothing is
        written then.
    """
    name = _manifest_name(config)

    scan = scan_corpus(
        config.corpus_dir,
        config.splits,
        sample_rate=config.sample_rate,
        full_decode=config.full_decode,
        num_workers=config.num_workers,
        show_progress=config.show_progress,
    )

    if scan.bad_files:
        if not config.skip_bad:
            raise BadFilesError(scan.bad_files)

        listing = "\n".join(f"  {bad.path}: {bad.reason}" for bad in scan.bad_files)

        log.warning("Skipping %d bad file(s) in manifest %s:\n%s", len(scan.bad_files), name, listing)

    if not scan.entries:
        raise ManifestError(
            f"No usable utterance in {', '.join(config.splits)} under {config.corpus_dir}; every file is bad."
        )

    return write_manifest(scan, config.output_dir, name)


def _manifest_name(config: ManifestConfig) -> str:
    if config.name is None:
        if len(config.splits) != 1:
            raise ManifestError(
                f"{len(config.splits)} splits are combined; give the manifest a name "
                "(e.g. `name='train'`, `--name train`)."
            )

        return config.splits[0]

    if not config.name or "/" in config.name or os.sep in config.name:
        raise ManifestError(
            f"`name` must be a plain non-empty file name, but is {config.name!r} instead; use `output_dir` to choose the folder."
        )

    return config.name


def scan_corpus(
    corpus_dir: Path,
    splits: Sequence[str],
    *,
    sample_rate: int = SAMPLE_RATE,
    full_decode: bool = False,
    num_workers: int = 4,
    show_progress: bool = True,
) -> CorpusScan:
    """Lists and checks every utterance of ``splits`` under ``corpus_dir``.

    With one split the audio root is the split folder; with several it is ``corpus_dir``
    and relative paths start with the split folder.

    :raises ManifestError: if ``corpus_dir`` or a split folder is missing, a split is given
        twice, or a split holds no audio file.
    """
    if not splits:
        raise ManifestError(f"No split is given for {corpus_dir}; name at least one split folder.")

    duplicates = sorted({split for split in splits if splits.count(split) > 1})
    if duplicates:
        raise ManifestError(
            f"`splits` must name each split once, but {', '.join(duplicates)} appear more than once instead."
        )

    if not corpus_dir.is_dir():
        raise ManifestError(
            f"Corpus directory {corpus_dir} does not exist; pass the folder that holds the "
            f"split folders ({', '.join(splits)})."
        )

    corpus_dir = corpus_dir.resolve()

    split_dirs = [corpus_dir / split for split in splits]

    for split_dir in split_dirs:
        if not split_dir.is_dir():
            raise ManifestError(
                f"Split directory {split_dir} does not exist; check the split name "
                f"(LibriSpeech has {', '.join(LIBRISPEECH_SPLITS)})."
            )

    audio_root = split_dirs[0] if len(split_dirs) == 1 else corpus_dir

    candidates: list[_Candidate] = []

    bad_files: list[BadFile] = []

    for split_dir in split_dirs:
        split_candidates = list(_list_split(split_dir, bad_files))

        if not split_candidates:
            raise ManifestError(f"Split directory {split_dir} is empty: it has no SPEAKER/CHAPTER/*.flac file.")

        candidates.extend(split_candidates)

    progress = ProgressLine("checking audio", len(candidates)) if show_progress else None

    def check(candidate: _Candidate) -> int | BadFile:
        try:
            info = inspect_audio(candidate.audio_path, sample_rate=sample_rate, full_decode=full_decode)
        except AudioFileError as ex:
            return BadFile(path=candidate.audio_path, reason=ex.reason)

        return info.num_samples

    entries: list[CorpusUtterance] = []

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for done, (candidate, result) in enumerate(zip(candidates, pool.map(check, candidates), strict=True), start=1):
            if isinstance(result, BadFile):
                bad_files.append(result)
            elif candidate.transcript is not None:
                entries.append(
                    CorpusUtterance(
                        rel_path=candidate.audio_path.relative_to(audio_root).as_posix(),
                        num_samples=result,
                        transcript=candidate.transcript,
                    )
                )

            if progress is not None:
                progress.update(done)

    entries.sort(key=lambda entry: entry.rel_path)

    bad_files.sort(key=lambda bad: bad.path)

    return CorpusScan(audio_root=audio_root, entries=entries, bad_files=bad_files)


@dataclass(frozen=True, kw_only=True)
class _Candidate:
    audio_path: Path

    transcript: str | None
    """``None`` if the file is already known to be bad (no transcript line, misnamed); its
    audio is still checked so that every reason for rejecting it is reported at once."""


def _list_split(split_dir: Path, bad_files: list[BadFile]) -> Iterator[_Candidate]:
    """Yields the audio files of ``split_dir``.

    Layout and transcript problems are appended to ``bad_files``.
    """
    for chapter_dir in sorted(path for path in split_dir.glob("*/*") if path.is_dir()):
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name

        trans_path = chapter_dir / f"{speaker}-{chapter}.trans.txt"

        transcripts = _read_chapter_transcripts(trans_path, bad_files)

        audio_paths = sorted(chapter_dir.glob("*.flac"))

        for audio_path in audio_paths:
            utterance_id = audio_path.stem

            transcript = transcripts.pop(utterance_id, None)

            if not utterance_id.startswith(f"{speaker}-{chapter}-"):
                bad_files.append(
                    BadFile(
                        path=audio_path,
                        reason=f"name does not match its folders; expected {speaker}-{chapter}-NNNN.flac",
                    )
                )

                transcript = None
            elif transcript is None:
                bad_files.append(
                    BadFile(
                        path=audio_path,
                        reason=f"no transcript line '{utterance_id} ...' in {trans_path}",
                    )
                )

            yield _Candidate(audio_path=audio_path, transcript=transcript)

        for utterance_id in sorted(transcripts):
            bad_files.append(
                BadFile(
                    path=chapter_dir / f"{utterance_id}.flac",
                    reason=f"listed in {trans_path.name} but the audio file is missing",
                )
            )


def _read_chapter_transcripts(trans_path: Path, bad_files: list[BadFile]) -> dict[str, str]:
    """Maps utterance ids to transcripts; an absent file maps nothing, so its audio is bad."""
    if not trans_path.is_file():
        return {}

    transcripts: dict[str, str] = {}

    for line_number, line in enumerate(trans_path.read_text(encoding="utf-8").splitlines(), 1):
        utterance_id, _, transcript = line.strip().partition(" ")

        transcript = transcript.strip()

        if not utterance_id or not transcript:
            bad_files.append(
                BadFile(
                    path=trans_path,
                    reason=f"line {line_number} is not 'UTTERANCE-ID TRANSCRIPT': {line!r}",
                )
            )
        elif utterance_id in transcripts:
            bad_files.append(
                BadFile(
                    path=trans_path,
                    reason=f"line {line_number} repeats utterance id {utterance_id}",
                )
            )
        else:
            transcripts[utterance_id] = transcript

    return transcripts


def write_manifest(scan: CorpusScan, output_dir: Path, name: str) -> ManifestFiles:
    """Writes ``{name}.tsv`` and ``{name}.wrd`` for ``scan.entries`` into ``output_dir``.

    Each file is written to a temporary file first and renamed into place, so a reader
    never sees a half-written manifest.
    """
    output_dir.mkdir(parents=True, exist_ok=True)

    files = ManifestFiles(
        tsv_path=output_dir / f"{name}.tsv",
        wrd_path=output_dir / f"{name}.wrd",
        num_entries=len(scan.entries),
    )

    tsv_lines = [str(scan.audio_root)]
    tsv_lines.extend(f"{entry.rel_path}\t{entry.num_samples}" for entry in scan.entries)

    wrd_lines = [entry.transcript for entry in scan.entries]

    write_lines_atomically(files.tsv_path, tsv_lines)
    write_lines_atomically(files.wrd_path, wrd_lines)

    return files


def read_manifest(path: Path) -> tuple[Path, list[tuple[str, int]]]:
    """Reads a ``.tsv`` manifest.

    :returns: The audio root and the ``(relative path, number of samples)`` of each entry.

    :raises ManifestError: if the file is missing, empty, or has a malformed line.
    """
    lines = _read_lines(path)

    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: the first line must be the audio root directory; regenerate the manifest.")

    root = Path(lines[0].strip())

    entries: list[tuple[str, int]] = []

    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")

        num_samples = _parse_num_samples(fields[1]) if len(fields) == 2 else None

        if not fields[0] or num_samples is None:
            raise ManifestError(
                f"{path}:{line_number}: the line must be 'RELATIVE_PATH<TAB>NUM_SAMPLES' with a "
                f"positive sample count, but is {line!r} instead; regenerate the manifest."
            )

        entries.append((fields[0], num_samples))

    return root, entries


def _parse_num_samples(field: str) -> int | None:
    return int(field) if field.isdigit() and int(field) > 0 else None


def read_manifest_transcripts(path: Path, *, manifest_path: Path | None = None) -> list[str]:
    """Reads a ``.wrd`` file and checks that it has one line per entry of its manifest.

    :param manifest_path: The ``.tsv`` the transcripts belong to; defaults to the
        ``.tsv`` next to ``path`` with the same name.

    :raises ManifestError: if a file is missing, a transcript is empty, or the line
        counts differ.
    """
    if manifest_path is None:
        manifest_path = path.with_suffix(".tsv")

    transcripts = _read_lines(path)

    for line_number, transcript in enumerate(transcripts, start=1):
        if not transcript.strip():
            raise ManifestError(f"{path}:{line_number}: the transcript is empty; regenerate the manifest.")

    _, entries = read_manifest(manifest_path)

    if len(transcripts) != len(entries):
        raise ManifestError(
            f"{path} has {len(transcripts)} transcript line(s) but {manifest_path} has "
            f"{len(entries)} entries; regenerate both together."
        )

    return transcripts


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist; create it with tools/make_manifest.py.") from None
    except (OSError, UnicodeDecodeError) as ex:
        raise ManifestError(f"{path} cannot be read as UTF-8 text ({ex}).") from ex
