"""Rebuild `splinter/assets/vocab.txt` (Splinter's cased WordPiece vocabulary) offline.

The published Splinter checkpoints use the bert-base-cased vocabulary (28,996 entries) with
`[unused100]` (id 104) renamed to `[QUESTION]`. We cannot download it, but the `blingfire`
package ships the same vocabulary as `bert_base_cased_tok.i2w` (id -> word table). Its layout:

* byte 0x60: uint32 little-endian entry count N;
* byte 0x68: N uint32 end offsets (exclusive, relative to the start of the string area);
* then the UTF-8 token bytes back to back (a short trailer follows the last entry).

Blingfire marks a word-initial piece with a leading space and writes continuation pieces bare,
so " The" -> "The" and "ing" -> "##ing". Special tokens are word-initial (" [PAD]" -> "[PAD]").

The blingfire package is located with `importlib.util.find_spec` and never imported: importing it
loads a native library we do not need.

Usage: python scripts/decode_blingfire_vocab.py [--out splinter/assets/vocab.txt] [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import struct
import sys
from pathlib import Path

COUNT_OFFSET = 0x60
ENDS_OFFSET = 0x68
EXPECTED_SIZE = 28996
QUESTION_ID = 104
# Ids the Splinter checkpoints (and bert-base-cased) rely on; checked after decoding.
KNOWN_IDS = {
    "[PAD]": 0,
    "[UNK]": 100,
    "[CLS]": 101,
    "[SEP]": 102,
    "[MASK]": 103,
    "[QUESTION]": 104,
    ".": 119,
    "The": 1109,
    "cat": 5855,
    "garden": 4605,
}


def blingfire_i2w_path(name: str = "bert_base_cased_tok.i2w") -> Path:
    spec = importlib.util.find_spec("blingfire")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "blingfire is not installed; run `bash scripts/setup.sh` (installs it with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / name


def decode_i2w(data: bytes) -> list[str]:
    """Blingfire i2w bytes -> WordPiece tokens in id order (`##` marks continuations)."""
    (count,) = struct.unpack_from("<I", data, COUNT_OFFSET)
    ends = struct.unpack_from(f"<{count}I", data, ENDS_OFFSET)
    base = ENDS_OFFSET + 4 * count
    if base + ends[-1] > len(data):
        raise ValueError("i2w table is truncated: string area ends past the file end")
    tokens: list[str] = []
    start = 0
    for end in ends:
        raw = data[base + start : base + end].decode("utf-8")
        start = end
        if not raw.strip():
            raise ValueError(f"empty token at id {len(tokens)}")
        tokens.append(raw[1:] if raw.startswith(" ") else "##" + raw)
    return tokens


def splinter_vocab(tokens: list[str]) -> list[str]:
    """Rename `[unused100]` to `[QUESTION]`, as the Splinter checkpoints do, and sanity-check."""
    if len(tokens) != EXPECTED_SIZE:
        raise ValueError(f"expected {EXPECTED_SIZE} tokens, decoded {len(tokens)}")
    if tokens[QUESTION_ID] != "[unused100]":
        raise ValueError(f"id {QUESTION_ID} is {tokens[QUESTION_ID]!r}, expected '[unused100]'")
    tokens = list(tokens)
    tokens[QUESTION_ID] = "[QUESTION]"
    if len(set(tokens)) != len(tokens):
        raise ValueError("decoded vocabulary has duplicate entries")
    for tok, idx in KNOWN_IDS.items():
        if tokens[idx] != tok:
            raise ValueError(f"id {idx} is {tokens[idx]!r}, expected {tok!r}")
    return tokens


def main(argv: list[str] | None = None) -> int:
    default_out = Path(__file__).resolve().parent.parent / "splinter" / "assets" / "vocab.txt"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--check", action="store_true", help="only verify that --out matches the decoded vocab")
    args = ap.parse_args(argv)

    tokens = splinter_vocab(decode_i2w(blingfire_i2w_path().read_bytes()))
    text = "".join(t + "\n" for t in tokens)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} differs from the decoded vocabulary", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(tokens)} tokens)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(tokens)} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
