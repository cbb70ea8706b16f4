"""Synthesizes a small speech corpus in the LibriSpeech layout with offline Debian TTS engines.

Each speaker is one engine/voice with its own speaking rate (and pitch for espeak-ng); the
transcripts are King James Bible verses (public domain) in LibriSpeech style: uppercase,
no punctuation except apostrophes, numbers spelled out. Speakers of ``train``, ``dev`` and
``test`` are disjoint. Audio is trimmed of leading/trailing silence, resampled to 16 kHz
and written as 16-bit mono FLAC; ``SPEAKERS.txt`` records each speaker's voice, and
``lm_text.txt`` holds the text for a language model: every verse except those of the
``dev`` and ``test`` splits.

The output is fully determined by ``--seed`` and the other options.

Needs: ``apt-get install --no-install-recommends espeak-ng flite festival festvox-kallpc16k
festvox-kdlpc16k festvox-us-slt-hts bible-kjv``.

Example (the bundled test corpus)::

    python tools/synthesize_corpus.py --output-dir tests/data/minispeech --seed 0
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio.functional

from w2v_knnvq.data.audio_check import SAMPLE_RATE
from w2v_knnvq.data.progress import ProgressLine
from w2v_knnvq.tool import tool_parser

LM_TEXT_FILE = "lm_text.txt"
"""The text for a language model, next to ``SPEAKERS.txt``."""

Engine = Literal["espeak-ng", "flite", "festival"]

# The apt package that provides each engine executable, voice or text.
_EXECUTABLE_PACKAGES = {
    "espeak-ng": "espeak-ng",
    "flite": "flite",
    "text2wave": "festival",
    "bible": "bible-kjv",
}

_FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}

_ALL_PACKAGES = "espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts bible-kjv"


@dataclass(frozen=True, kw_only=True)
class Voice:
    engine: Engine

    name: str
    """espeak-ng ``LANGUAGE+VARIANT``, flite voice, or festival voice."""

    pitch: int = 50
    """espeak-ng base pitch, 0-99; the other engines keep their voice's own pitch."""


# Sixteen voices that sound distinct; the order fixes speaker ids, and the last four are
# held out: two for dev, two for test.
VOICES: tuple[Voice, ...] = (
    Voice(engine="espeak-ng", name="en-us+m3", pitch=35),
    Voice(engine="espeak-ng", name="en-gb+f2", pitch=65),
    Voice(engine="espeak-ng", name="en-gb-scotland+m1", pitch=30),
    Voice(engine="espeak-ng", name="en-029+m5", pitch=45),
    Voice(engine="espeak-ng", name="en-gb-x-gbclan+f3", pitch=70),
    Voice(engine="espeak-ng", name="en-us+m7", pitch=20),
    Voice(engine="espeak-ng", name="en-gb-x-gbcwmd+f5", pitch=55),
    Voice(engine="flite", name="kal16"),
    Voice(engine="flite", name="awb"),
    Voice(engine="flite", name="slt"),
    Voice(engine="festival", name="kal_diphone"),
    Voice(engine="festival", name="cmu_us_slt_arctic_hts"),
    Voice(engine="espeak-ng", name="en-gb-x-rp+f4", pitch=75),
    Voice(engine="festival", name="ked_diphone"),
    Voice(engine="espeak-ng", name="en-us-nyc+m2", pitch=40),
    Voice(engine="flite", name="rms"),
)

_NUM_HELD_OUT_PER_SPLIT = 2

# Peak level of every utterance (-10 dBFS): the engines write at different levels, and a
# common, moderate one keeps speakers comparable and FLAC files small.
_PEAK_LEVEL = 0.316


@dataclass(frozen=True, kw_only=True)
class Speaker:
    speaker_id: int

    split: str

    voice: Voice

    rate: float
    """Speaking rate relative to the engine's default; above 1 is faster."""

    pitch: int


@dataclass(frozen=True, kw_only=True)
class Verse:
    text: str
    """As printed, with punctuation, which the engines use for prosody."""

    transcript: str
    """LibriSpeech style: uppercase words, apostrophes kept."""


@dataclass(kw_only=True)
class CorpusConfig:
    output_dir: Path

    seed: int = 0

    num_utterances: dict[str, int]
    """Utterances of the ``train``, ``dev`` and ``test`` splits, by split name."""

    min_words: int = 5

    max_words: int = 9

    min_seconds: float = 1.5

    max_seconds: float = 5.0

    num_jobs: int = 2


def check_engines() -> None:
    """Fails with the apt command to run if an engine, voice or the KJV text is missing."""
    missing = {package for executable, package in _EXECUTABLE_PACKAGES.items() if shutil.which(executable) is None}

    if "festival" not in missing:
        for voice_name, package in _FESTIVAL_VOICE_PACKAGES.items():
            try:
                _run_festival("test", voice_name, 1.0)
            except RuntimeError:
                missing.add(package)

    if missing:
        raise SystemExit(
            f"missing TTS packages: {' '.join(sorted(missing))}; install them with\n"
            f"  apt-get update && apt-get install -y --no-install-recommends {_ALL_PACKAGES}"
        )


def load_verses(*, min_words: int, max_words: int) -> list[Verse]:
    """Returns the distinct KJV verses of ``min_words`` to ``max_words`` words with no
    digits and few proper names, in Bible order."""
    verses = []

    seen: set[str] = set()

    for verse in _kjv_verses():
        if re.search(r"\d", verse.text) or _count_names(verse.text) > _MAX_NAMES_PER_VERSE:
            continue

        transcript = verse.transcript

        # Verses like "And the LORD spake unto Moses, saying," recur dozens of times.
        if min_words <= len(transcript.split()) <= max_words and transcript not in seen:
            seen.add(transcript)

            verses.append(verse)

    return verses


def write_lm_text(output_dir: Path, held_out_splits: Sequence[str]) -> Path:
    """Writes ``lm_text.txt``, the text for a language model: every KJV verse in
    LibriSpeech style, one per line, except those read in ``held_out_splits``, as
    LibriSpeech's language-model text leaves out its dev and test books."""
    held_out = set()

    for split in held_out_splits:
        for trans_file in (output_dir / split).rglob("*.trans.txt"):
            for line in trans_file.read_text(encoding="utf-8").splitlines():
                held_out.add(" ".join(line.split()[1:]))

    lines = [verse.transcript for verse in _kjv_verses() if verse.transcript and verse.transcript not in held_out]

    path = output_dir / LM_TEXT_FILE

    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    return path


def _kjv_verses() -> Iterator[Verse]:
    """Every verse of the KJV in Bible order."""
    result = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True)

    for line in result.stdout.splitlines():
        # Each line is "REFERENCE TEXT", e.g. "Ge1:1 In the beginning ...".
        _, _, text = line.partition(" ")

        transcript = " ".join(re.sub(r"[^A-Z']+", " ", text.upper()).split())

        yield Verse(text=text.strip(), transcript=transcript)


# Short verses are often lists of names (genealogies, dukes of Edom); engines pronounce
# those erratically, so keep verses that are mostly ordinary words.
_MAX_NAMES_PER_VERSE = 1

_CAPITALIZED_COMMON_WORDS = frozenset({"I", "O", "God", "Lord", "LORD"})


def _count_names(text: str) -> int:
    """Counts capitalized words after the first one, apart from a few common ones."""
    words = re.findall(r"[A-Za-z']+", text)[1:]

    return sum(word[0].isupper() and word not in _CAPITALIZED_COMMON_WORDS for word in words)


def make_speakers(seed: int) -> list[Speaker]:
    rng = random.Random(f"speakers-{seed}")

    num_train = len(VOICES) - 2 * _NUM_HELD_OUT_PER_SPLIT

    speakers = []

    for index, voice in enumerate(VOICES):
        if index < num_train:
            split = "train"
        elif index < num_train + _NUM_HELD_OUT_PER_SPLIT:
            split = "dev"
        else:
            split = "test"

        speakers.append(
            Speaker(
                speaker_id=1001 + index,
                split=split,
                voice=voice,
                rate=round(rng.uniform(1.0, 1.25), 2),
                pitch=min(99, max(0, voice.pitch + rng.randint(-8, 8))),
            )
        )

    return speakers


def synthesize(text: str, speaker: Speaker) -> tuple[np.ndarray, int]:
    """Returns the engine's waveform ``(S,)`` as float32 and its sample rate."""
    voice = speaker.voice

    if voice.engine == "festival":
        return _run_festival(text, voice.name, speaker.rate)

    with tempfile.TemporaryDirectory() as tmp_dir:
        wav_path = Path(tmp_dir) / "out.wav"

        if voice.engine == "espeak-ng":
            words_per_minute = round(175 * speaker.rate)

            command = ["espeak-ng", "-v", voice.name, "-p", str(speaker.pitch)]
            command += ["-s", str(words_per_minute), "-w", str(wav_path), text]
        else:
            stretch = f"duration_stretch={1.0 / speaker.rate:.3f}"

            command = ["flite", "-voice", voice.name, "--setf", stretch, "-t", text]
            command += ["-o", str(wav_path)]

        subprocess.run(command, check=True, capture_output=True)

        return _read_mono(wav_path)


def _run_festival(text: str, voice_name: str, rate: float) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as tmp_dir:
        wav_path = Path(tmp_dir) / "out.wav"

        command = ["text2wave", "-eval", f"(voice_{voice_name})"]
        command += ["-eval", f"(Parameter.set 'Duration_Stretch {1.0 / rate:.3f})"]
        command += ["-o", str(wav_path)]

        result = subprocess.run(command, input=text, capture_output=True, text=True)

        # text2wave exits 0 even when the voice is missing, so check the output too.
        if result.returncode != 0 or not wav_path.is_file():
            raise RuntimeError(f"festival voice {voice_name} failed: {result.stderr.strip()}")

        return _read_mono(wav_path)


def _read_mono(path: Path) -> tuple[np.ndarray, int]:
    waveform, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)

    return waveform.mean(axis=1), sample_rate


def to_corpus_audio(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resamples ``(S,)`` to 16 kHz, trims silence at both ends and peak-normalizes to -10 dBFS."""
    resampled = torchaudio.functional.resample(
        torch.from_numpy(waveform), orig_freq=sample_rate, new_freq=SAMPLE_RATE
    ).numpy()

    peak = float(np.abs(resampled).max(initial=0.0))

    if peak == 0.0:
        return resampled[:0]

    # Samples below -40 dB of the peak count as silence; keep 50 ms around the speech.
    loud = np.flatnonzero(np.abs(resampled) > 0.01 * peak)

    margin = SAMPLE_RATE // 20

    start, end = max(0, loud[0] - margin), min(len(resampled), loud[-1] + 1 + margin)

    return (_PEAK_LEVEL / peak) * resampled[start:end]


def build_corpus(config: CorpusConfig) -> None:
    existing = [config.output_dir / split for split in config.num_utterances if (config.output_dir / split).exists()]
    if existing:
        raise SystemExit(
            f"{', '.join(map(str, existing))} already exist(s); remove them or choose another --output-dir"
        )

    check_engines()

    verses = load_verses(min_words=config.min_words, max_words=config.max_words)

    random.Random(f"verses-{config.seed}").shuffle(verses)

    speakers = make_speakers(config.seed)

    # Each speaker draws from its own slice of the shuffled verses, so no verse repeats
    # and the result does not depend on the order in which speakers finish.
    verse_pools = {speaker.speaker_id: verses[index :: len(speakers)] for index, speaker in enumerate(speakers)}

    quotas = _speaker_quotas(speakers, config.num_utterances)

    progress = ProgressLine("synthesizing utterances", sum(quotas.values()))
    progress_lock = threading.Lock()
    num_done = 0

    def on_utterance_done() -> None:
        nonlocal num_done

        with progress_lock:
            num_done += 1

            progress.update(num_done)

    def build_speaker(speaker: Speaker) -> None:
        _build_speaker(
            speaker,
            verse_pools[speaker.speaker_id],
            quotas[speaker.speaker_id],
            config,
            on_utterance_done,
        )

    with ThreadPoolExecutor(max_workers=max(1, config.num_jobs)) as pool:
        list(pool.map(build_speaker, speakers))

    _write_speakers_file(config.output_dir, speakers)

    write_lm_text(config.output_dir, [split for split in config.num_utterances if split != "train"])


def _speaker_quotas(speakers: list[Speaker], num_utterances: dict[str, int]) -> dict[int, int]:
    """Spreads each split's utterances evenly over its speakers."""
    quotas = {}

    for split, total in num_utterances.items():
        split_speakers = [speaker for speaker in speakers if speaker.split == split]

        for index, speaker in enumerate(split_speakers):
            quotas[speaker.speaker_id] = total // len(split_speakers) + (
                1 if index < total % len(split_speakers) else 0
            )

    return quotas


def _build_speaker(
    speaker: Speaker,
    verses: list[Verse],
    num_utterances: int,
    config: CorpusConfig,
    on_utterance_done: Callable[[], None],
) -> None:
    # Training speakers read two chapters, as most LibriSpeech speakers do.
    num_chapters = min(2 if speaker.split == "train" else 1, num_utterances)

    chapter_ids = [speaker.speaker_id * 10 + chapter for chapter in range(num_chapters)]

    transcripts: dict[int, list[str]] = {chapter_id: [] for chapter_id in chapter_ids}

    remaining = iter(verses)

    for utterance_index in range(num_utterances):
        chapter_id = chapter_ids[utterance_index % num_chapters]

        chapter_dir = config.output_dir / speaker.split / str(speaker.speaker_id) / str(chapter_id)
        chapter_dir.mkdir(parents=True, exist_ok=True)

        utterance_id = f"{speaker.speaker_id}-{chapter_id}-{len(transcripts[chapter_id]):04d}"

        verse, audio = _next_fitting_verse(remaining, speaker, config)

        soundfile.write(
            chapter_dir / f"{utterance_id}.flac",
            audio,
            SAMPLE_RATE,
            subtype="PCM_16",
            format="FLAC",
            compression_level=1.0,
        )

        transcripts[chapter_id].append(f"{utterance_id} {verse.transcript}")

        on_utterance_done()

    for chapter_id, lines in transcripts.items():
        trans_path = (
            config.output_dir
            / speaker.split
            / str(speaker.speaker_id)
            / str(chapter_id)
            / f"{speaker.speaker_id}-{chapter_id}.trans.txt"
        )

        trans_path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _next_fitting_verse(verses: Iterator[Verse], speaker: Speaker, config: CorpusConfig) -> tuple[Verse, np.ndarray]:
    """Synthesizes verses until one lasts between ``min_seconds`` and ``max_seconds``."""
    for verse in verses:
        waveform, sample_rate = synthesize(verse.text, speaker)

        audio = to_corpus_audio(waveform, sample_rate)

        if config.min_seconds * SAMPLE_RATE <= len(audio) <= config.max_seconds * SAMPLE_RATE:
            return verse, audio

    raise SystemExit(
        f"speaker {speaker.speaker_id} ran out of verses of {config.min_words}-"
        f"{config.max_words} words lasting {config.min_seconds}-{config.max_seconds} s; "
        "widen --min-words/--max-words or the duration range"
    )


def _write_speakers_file(output_dir: Path, speakers: list[Speaker]) -> None:
    lines = [";ID   |SUBSET|ENGINE    |VOICE                |RATE|PITCH"]

    for speaker in speakers:
        pitch = str(speaker.pitch) if speaker.voice.engine == "espeak-ng" else "-"

        lines.append(
            f"{speaker.speaker_id:<5} |{speaker.split:<6}|{speaker.voice.engine:<10}|"
            f"{speaker.voice.name:<21}|{speaker.rate:.2f}|{pitch}"
        )

    (output_dir / "SPEAKERS.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _parse_args(argv: Sequence[str] | None) -> CorpusConfig:
    parser = tool_parser(__doc__)

    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-utterances", type=int, default=84)
    parser.add_argument("--dev-utterances", type=int, default=16)
    parser.add_argument("--test-utterances", type=int, default=16)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-words", type=int, default=9)
    parser.add_argument("--min-seconds", type=float, default=1.5)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--num-jobs", type=int, default=2, help="speakers synthesized at once")

    args = parser.parse_args(argv)

    return CorpusConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        num_utterances={
            "train": args.train_utterances,
            "dev": args.dev_utterances,
            "test": args.test_utterances,
        },
        min_words=args.min_words,
        max_words=args.max_words,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        num_jobs=args.num_jobs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = _parse_args(argv)

    build_corpus(config)

    print(f"wrote the corpus to {config.output_dir}", file=sys.stderr)

    return 0


if __name__ == "__main__":
    sys.exit(main())
