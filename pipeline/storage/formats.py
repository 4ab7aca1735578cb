"""Input formats: telling them apart, and the records of formats that must be parsed whole.

`detect_format` decides from a file's name (compression suffixes aside) and, where the name does not
settle it, from its first bytes: Parquet's magic, `<doc` (wikiextractor), and for JSON whether it holds
one object per line (JSON Lines, however long the first line), one array of records, or one SQuAD
document (one line or pretty-printed). When JSON cannot be told apart it stops with an error naming
`--format` instead of guessing.

SQuAD and JSON-array files are parsed once per process (`parsed`), keyed by their size and modification
time, so the shards of one file that a worker reads do not each parse it again.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from pipeline.settings import ConfigError
from pipeline.storage.filesystems import open_input, read_bytes, read_head, strip_codec_suffix
from splinter.mrqa import is_mrqa, mrqa_rows

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson")
TEXT_EXT = (".txt", ".text", ".md")
BLANK = b"\xef\xbb\xbf \t\r\n"
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_CHUNK = 1 << 20


TOO_DEEP = "too_deep"  # what `loads` returns for JSON nested deeper than the parser's recursion limit


def loads(raw: bytes | bytearray) -> Any:
    """The JSON value of `raw`; None when it is not JSON, TOO_DEEP when it nests too deep to parse.

    A UTF-8 byte order mark (editors on Windows write one) is not part of the record."""
    try:
        return json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
    except ValueError:
        return None
    except RecursionError:  # json's C scanner stops cleanly at the recursion limit: one bad record
        return TOO_DEEP


# A JSON string this long (in bytes, quotes included) is decoded in pieces of about `_STRING_PIECE` bytes
# by `loads_taken`. Pieces are small so that their transient copies stay small too.
_BIG_STRING = 1 << 20
_STRING_PIECE = 1 << 16
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Bytes after which a JSON string's body may be cut: ASCII that is not part of any escape sequence,
# so the pieces of a valid body are valid bodies, and decode to the pieces of its text.
_CUT_AFTER = re.compile(b"[" + b"".join(re.escape(bytes([c])) for c in range(0x20, 0x80)
                                        if bytes([c]) not in b'\\"/bfnrtu0123456789abcdefABCDEF') + b"]")


def loads_taken(holder: list[bytes | bytearray]) -> Any:
    """`loads` of the line in `holder`, which it empties, so that nothing else need keep the line.

    A line holding a JSON string over `_BIG_STRING` bytes (a huge document's text) is not decoded whole:
    each such string's body is decoded in small pieces into UTF-8, the line is let go, and only then is
    the text made. Peak memory: the line and the text's UTF-8 (1x each), then the UTF-8 and the text
    (1x + 1-4x by its widest character), instead of the line, its decoded copy and the text at once.
    The value equals `loads`' in every case: a line that is not valid JSON goes through `loads` whole.
    """
    raw = holder.pop()
    if len(raw) < _BIG_STRING:
        return loads(raw)
    spans = [m.span() for m in _JSON_STRING.finditer(raw) if m.end() - m.start() > _BIG_STRING]
    if not spans:
        return loads(raw)
    try:
        bodies = [_string_utf8(raw, start + 1, stop - 1) for start, stop in spans]
    except ValueError:
        return loads(raw)  # not valid JSON: loads says what it is
    # The line with each big string replaced by a marker no real record holds (a random token).
    token = os.urandom(16).hex()
    markers = [f"\0{token}-{k}" for k in range(len(spans))]
    pieces, last = [], 0
    for (start, stop), marker in zip(spans, markers, strict=True):
        pieces += [raw[last:start], json.dumps(marker).encode()]
        last = stop
    pieces.append(raw[last:])
    value = loads(b"".join(pieces))
    del raw, pieces
    texts: dict[str, str] = {}
    for k, marker in enumerate(markers):
        texts[marker] = bodies[k].decode("utf-8", "surrogatepass")
        bodies[k] = bytearray()
    return _replace_strings(value, texts)


def _string_utf8(raw: bytes | bytearray, start: int, stop: int) -> bytearray:
    """The text of the JSON string body `raw[start:stop]` as UTF-8 (lone surrogates kept), decoded in
    pieces cut after `_CUT_AFTER` bytes; ValueError where the body is not valid JSON."""
    # Sized once for the body (its UTF-8 is no longer, but for invalid bytes decoded as U+FFFD): a
    # buffer grown step by step would leave the heap holding its earlier sizes.
    out = bytearray(stop - start)
    size = 0
    view = memoryview(raw)
    while start < stop:
        cut = min(start + _STRING_PIECE, stop)
        if cut < stop:
            found = _CUT_AFTER.search(raw, cut - 1, stop)
            cut = found.end() if found else stop
        body = bytes(view[start:cut]).decode("utf-8", errors="replace")
        piece = json.loads(f'"{body}"').encode("utf-8", "surrogatepass")
        out[size : size + len(piece)] = piece
        size += len(piece)
        start = cut
    del out[size:]
    return out


def _replace_strings(value: Any, texts: dict[str, str]) -> Any:
    """`value` with every string (value or key) found in `texts` replaced by its entry."""
    if isinstance(value, str):
        return texts.get(value, value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            for i, v in enumerate(item):
                if isinstance(v, str):
                    item[i] = texts.get(v, v)
                elif isinstance(v, list | dict):
                    stack.append(v)
        elif isinstance(item, dict):
            if any(k in texts for k in item):
                pairs = [(texts.get(k, k), v) for k, v in item.items()]
                item.clear()
                item.update(pairs)
            for k, v in item.items():
                if isinstance(v, str):
                    item[k] = texts.get(v, v)
                elif isinstance(v, list | dict):
                    stack.append(v)
    return value


def unicode_width(head: bytes) -> str | None:
    """'UTF-16' or 'UTF-32' when a file's first bytes say so (a byte order mark, or NULs between ASCII)."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    sample = head[:64]
    if len(sample) >= 8 and sample.count(0) * 4 >= len(sample) * 3 - 4:
        return "UTF-32"
    if len(sample) >= 4 and (sample[1::2].count(0) == len(sample[1::2]) or sample[0::2].count(0) == len(sample[0::2])):
        return "UTF-16"
    return None


def _is_squad(obj: Any) -> bool:
    data = obj.get("data") if isinstance(obj, dict) else None
    return isinstance(data, list) and all(isinstance(a, dict) and "paragraphs" in a for a in data[:5])


def _first_line(path: str, size: int | None) -> tuple[bytes, bytes]:
    """The first non-blank line (however long) and up to 64 KiB of what follows it."""
    pieces: list[bytes] = []
    with open_input(path, size) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return b"".join(pieces), b""
            if not pieces:
                chunk = chunk.lstrip(BLANK)
            nl = chunk.find(b"\n")
            if nl >= 0:
                pieces.append(chunk[:nl])
                return b"".join(pieces), chunk[nl + 1:] + f.read(64 << 10)
            pieces.append(chunk)


_FIRST_KEY = re.compile(rb'\{[ \t\r\n]*("[^"\\]*(?:\\.[^"\\]*)*")[ \t\r\n]*:')


def _starts_with_mrqa_header(path: str, size: int | None) -> bool:
    """`is_mrqa` of the first line, without reading a long first line (one huge record) whole: a header's
    only key is "header", so a line whose first key is another is not one."""
    head = read_head(path, 64 << 10, size)
    line = head.lstrip(BLANK)
    if line and b"\n" in line:
        return is_mrqa(line[: line.index(b"\n")])
    key = _FIRST_KEY.match(line)
    if line and not (key and loads(key.group(1)) == "header"):
        return False
    return is_mrqa(_first_line(path, size)[0])


def _json_kind(path: str, size: int | None, version: str) -> str | None:
    """jsonl, json (array) or squad for JSON content; None when it cannot be told."""
    first, rest = _first_line(path, size)
    if first.startswith(b"["):
        return "json"
    if not first.startswith(b"{"):
        return None
    obj = loads(first)
    if isinstance(obj, dict):
        if is_mrqa(first):
            return "mrqa"
        if rest.strip(BLANK):
            return "jsonl"
        if _is_squad(obj):
            _remember(path, version, "squad", obj)
            return "squad"
        return "jsonl"
    # Not one object per line: one multi-line document (pretty-printed SQuAD), or JSON Lines whose
    # first record is broken.
    doc = loads(read_bytes(path))
    if _is_squad(doc):
        _remember(path, version, "squad", doc)
        return "squad"
    second = next((line for line in rest.split(b"\n") if line.strip(BLANK)), b"")
    return "jsonl" if isinstance(loads(second), dict) else None


def detect_format(path: str, size: int | None = None, version: str = "", head: bytes | None = None) -> str:
    """The format of one file from its name (compression suffixes aside) and, where needed, its content."""
    name = strip_codec_suffix(path)
    if name.endswith(PARQUET_EXT):
        return "parquet"
    if head is None:
        head = read_head(path, 4096, size)
    if head.startswith(b"PAR1"):
        return "parquet"
    if name.endswith(JSONL_EXT):
        # The MRQA shared task's files (the authors' few-shot splits) are JSON Lines behind a header line.
        return "mrqa" if _starts_with_mrqa_header(path, size) else "jsonl"
    body = head.lstrip(BLANK)
    if name.endswith(".json"):
        kind = _json_kind(path, size, version)
        if kind is None:
            raise ConfigError(f"cannot tell the format of {path}: it is neither JSON Lines, a JSON array nor "
                              "SQuAD JSON; pass --format (parquet, jsonl, json, squad, text, textblocks, "
                              "wikiextractor)")
        return kind
    if body.startswith(b"<doc"):
        return "wikiextractor"
    if not name.endswith(TEXT_EXT) and body.startswith(b"{"):
        # A file without a telling name that holds JSON records (e.g. Spark's part-00000).
        return _json_kind(path, size, version) or "text"
    return "text"


# ---------------------------------------------------------------- parsed files (once per process)

_PARSED: OrderedDict[tuple[str, str], list[tuple[int, dict[str, Any], str]]] = OrderedDict()
_PARSED_KEEP = 2  # files kept parsed per process: shards of one file usually follow each other


def _remember(path: str, version: str, fmt: str, doc: Any) -> list[tuple[int, dict[str, Any], str]]:
    records = list(_squad_records(doc) if fmt == "squad" else _array_records(doc))
    _PARSED[(path, version)] = records
    _PARSED.move_to_end((path, version))
    while len(_PARSED) > _PARSED_KEEP:
        _PARSED.popitem(last=False)
    return records


def parsed(path: str, version: str, fmt: str) -> list[tuple[int, dict[str, Any], str]]:
    """(position, record, read error) of every record of a SQuAD or JSON-array file."""
    key = (path, version)
    if key in _PARSED and version:
        _PARSED.move_to_end(key)
        return _PARSED[key]
    raw = read_bytes(path)
    if fmt == "mrqa":
        try:
            rows = mrqa_rows(raw.decode("utf-8", errors="replace").splitlines(), path)
        except ValueError as exc:
            raise ConfigError(f"{exc}; pass --format if it is another format") from None
        _PARSED[(path, version)] = records = [(i, row, "") for i, row in enumerate(rows)]
        while len(_PARSED) > _PARSED_KEEP:
            _PARSED.popitem(last=False)
        return records
    try:
        doc = json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
    except RecursionError:
        # Nested deeper than Python can parse: the whole file is one bad record, counted, not a crash.
        print(f"WARNING: {path} nests JSON too deep to parse; counted as one bad record ({TOO_DEEP})",
              file=sys.stderr)
        _PARSED[key] = [(0, {}, TOO_DEEP)]
        return _PARSED[key]
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix it, or pass --format jsonl if it holds "
                          "one record per line") from None
    if fmt == "squad" and not isinstance(doc, dict):
        raise ConfigError(f"{path} is not SQuAD JSON (no top-level object with a 'data' list); pass --format")
    if fmt == "json" and not isinstance(doc, list):
        raise ConfigError(f"{path} does not hold a JSON array of records; pass --format")
    return _remember(path, version, fmt, doc)


def _squad_records(doc: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], str]]:
    """One record per question; a malformed article or paragraph becomes one error record, never nothing."""
    n = 0
    articles = doc.get("data")
    for article in articles if isinstance(articles, list) else [None]:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            yield n, {}, "malformed_squad"
            n += 1
            continue
        for p, para in enumerate(paragraphs):
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                yield n, {}, "malformed_squad"
                n += 1
                continue
            for k, qa in enumerate(qas):
                if not isinstance(qa, dict):
                    yield n, {}, "malformed_squad"
                else:
                    # question_index 0 marks a paragraph's first question: read as a corpus (mine, extract
                    # --questions), a paragraph is one document, taken from that record.
                    yield n, {"id": qa.get("id"), "question": qa.get("question"), "context": para.get("context"),
                              "title": article.get("title"), "paragraph": p, "question_index": k}, ""
                n += 1


def _array_records(doc: list[Any]) -> Iterator[tuple[int, dict[str, Any], str]]:
    for i, rec in enumerate(doc):
        yield (i, rec, "") if isinstance(rec, dict) else (i, {}, "not_an_object")


def wikiextractor_docs(raw: bytes) -> Iterator[tuple[dict[str, str], str]]:
    text = raw.decode("utf-8", errors="replace")
    for block in text.split("<doc")[1:]:
        head, _, body = block.partition(">")
        body = body.split("</doc>", 1)[0].strip("\n")
        # The authors drop the first line of each doc: wikiextractor repeats the title there.
        lines = body.split("\n")
        yield dict(_ATTR.findall(head)), "\n".join(lines[1:])
