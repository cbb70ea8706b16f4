"""Trains a character-level SentencePiece tokenizer for CTC fine-tuning.

Reads transcripts from ``.wrd`` manifest files (one transcript per line) or LibriSpeech
``.trans.txt`` files (directories are searched recursively) and writes ``NAME.model`` and the
fairseq2 asset card ``NAME.yaml`` (family ``char_tokenizer``). Id 0 is ``<pad>`` and the CTC
blank, id 1 ``<unk>``; there is no BOS/EOS. The printed vocabulary size is the CTC model's
``target_vocab_size``.

Examples::

    python tools/train_tokenizer.py manifests/train.wrd --output-dir tokenizer --name ls_char
    python tools/train_tokenizer.py /data/LibriSpeech/train-clean-100 --output-dir tokenizer

Use it in the fine-tuning recipe with ``tokenizer.path=OUTPUT_DIR/NAME.yaml`` (or the
``NAME.model`` file); ``tokenizer.name`` only names the tokenizer the recipe trains itself
when ``tokenizer.path`` is not set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from w2v_knnvq.text.tokenizer import load_ctc_tokenizer, read_transcripts, train_char_tokenizer
from w2v_knnvq.tool import tool_parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(__doc__)

    parser.add_argument(
        "transcripts",
        type=Path,
        nargs="+",
        help="*.wrd or *.trans.txt files, or folders searched for them",
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--name", default="librispeech_char", help="asset card name and file stem")

    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)

    try:
        transcripts = read_transcripts(args.transcripts)

        print(f"training on {len(transcripts)} transcripts", file=sys.stderr)

        card_path = train_char_tokenizer(transcripts, args.output_dir, args.name)

        # Loading through fairseq2 proves the card is usable before a recipe depends on it.
        tokenizer = load_ctc_tokenizer(card_path)
    except (OSError, ValueError) as ex:
        print(f"error: {ex}", file=sys.stderr)

        return 1

    print(
        f"wrote {card_path} and {card_path.with_suffix('.model')}; "
        f"vocabulary size {tokenizer.vocab_info.size} (set target_vocab_size to it)",
        file=sys.stderr,
    )

    return 0


if __name__ == "__main__":
    sys.exit(main())
