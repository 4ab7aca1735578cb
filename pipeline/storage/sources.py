"""Input corpora: find files, tell their format, cut them into deterministic shards, read a shard into rows.

A shard is the unit of work, commit and resume. Shards are planned on the driver from one listing per
input and a small probe per file (the first bytes; a Parquet footer; SQuAD and JSON-array files are
parsed to count their records), never a request per shard; the plan never depends on how many workers
run it. Formats (`--format auto` tells them apart by name and content):
- parquet: row ranges (inside row groups too), so one big row group still spreads over workers;
- jsonl: byte ranges of the file (a line belongs to the range it starts in); a compressed file is one shard;
- json (an array of records) and squad: record ranges; the file is parsed once per worker process;
- text (one document per file, small files grouped), textblocks (blank-line separated), wikiextractor.
Every format may be gzip/bzip2/zstd compressed (`.gz`, `.bz2`, `.zst`, or recognised by content).

Two row kinds come out of a shard:
- "documents" (mining): `doc_id`, `text`;
- "questions" (QA): `id`, `question`, `context`.
Every row also carries `_error`: "" or why the source record could not be read (invalid JSON,
missing column, invalid Unicode...). Such rows still flow to the output so that every record is
accounted for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.settings import ConfigError
from pipeline.storage.filesystems import (
    InputFile,
    filesystem,
    install_filesystems,
    list_files,
    open_input,
    read_bytes,
    split_query,
    strip_codec_suffix,
)
from pipeline.storage.formats import (
    PARQUET_EXT,
    TOO_DEEP,
    detect_format,
    loads_taken,
    parsed,
    unicode_width,
    wikiextractor_docs,
)

__all__ = ["InputFile", "ReadOptions", "Shard", "expand_inputs", "list_inputs",
           "plan_shards", "read_shard"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_CHUNK = 1 << 20

# Small inputs are still cut into a few shards so a laptop run spreads over its workers; shards never
# get smaller than these (per-shard costs: a task, a file, a commit), and never bigger than the config says.
TARGET_SHARDS = 8
MIN_SHARD_BYTES = 64 << 10
MIN_SHARD_ROWS = 64
PROBE_THREADS = 16


@dataclass(frozen=True)
class Shard:
    index: int
    format: str
    paths: tuple[str, ...]
    start: int = 0  # row / byte offset / record, by format
    stop: int = -1  # -1: to the end of the file
    # size:mtime of the shard's files: the plan fingerprint covers it (resume refuses changed inputs),
    # and it keys the per-worker parse cache.
    version: str = ""

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shard:
        return cls(int(d["index"]), str(d["format"]), tuple(d["paths"]), int(d["start"]), int(d["stop"]),
                   str(d.get("version", "")))


@dataclass(frozen=True)
class ReadOptions:
    """How records become rows; the same object travels to every reading worker."""

    kind: str  # "documents" | "questions"
    text_column: str = "text"
    id_column: str = "id"
    question_column: str = "question"
    context_column: str = "context"
    extra: dict[str, Any] = field(default_factory=dict)
    # The driver's storage clients for this job's locations (see pipeline.storage.filesystems.export_filesystems).
    filesystems: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- finding files

def list_inputs(inputs: list[str], exclude: str | None = None) -> list[InputFile]:
    """Files named by paths, directories (recursive) and globs, sorted and without duplicates.

    `exclude` (the job's output) is never read as input, even when it lies inside an input directory."""
    found: dict[str, InputFile] = {}
    for item in inputs:
        for entry in list_files(item, exclude):
            found.setdefault(entry.uri, entry)
    if not found:
        raise ConfigError(f"no input files found in: {', '.join(inputs)}")
    return sorted(found.values(), key=lambda e: e.uri)


def expand_inputs(inputs: list[str]) -> list[str]:
    return [e.uri for e in list_inputs(inputs)]


# ---------------------------------------------------------------- planning

@dataclass
class _Probe:
    entry: InputFile
    format: str
    rows: int = 0  # parquet / squad / json records
    compressed: bool = False


def _probe(entry: InputFile, input_format: str, required: dict[str, str]) -> _Probe:
    path, fmt = entry.uri, input_format
    try:
        head, compressed = b"", False
        if not strip_codec_suffix(path).endswith(PARQUET_EXT) or input_format not in ("auto", "parquet"):
            with open_input(path, entry.size) as f:
                compressed = isinstance(f, pa.CompressedInputStream)
                head = f.read(4096)
        width = unicode_width(head) if fmt != "parquet" and not head.startswith(b"PAR1") else None
        if width:
            raise ConfigError(f"{path} is {width} text; convert it to UTF-8 (iconv -f {width} -t UTF-8) "
                              "and run again")
        if input_format == "auto":
            fmt = detect_format(path, entry.size, entry.version, head)
        probe = _Probe(entry, fmt, compressed=compressed)
        if fmt == "parquet":
            pf = _parquet(path, entry.size)
            names = pf.schema_arrow.names
            missing = [(col, flag) for col, flag in required.items() if col not in names]
            if missing:
                col, flag = missing[0]
                raise ConfigError(f"{path} has no column {col!r} (columns: {', '.join(names)}); "
                                  f"pass {flag} NAME")
            probe.rows = pf.metadata.num_rows
        elif fmt in ("squad", "json", "mrqa"):
            probe.rows = len(parsed(path, entry.version, fmt))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{path} is not a readable {fmt} file ({str(exc).strip().splitlines()[0]}); "
                          "pass --format if it is another format") from None
    return probe


def _ranges(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)] or [(0, 0)]


def plan_shards(paths: list[str] | list[InputFile], input_format: str, shard_rows: int, shard_bytes: int,
                required: dict[str, str] | None = None) -> list[Shard]:
    """Cut the files into shards. Same files and settings give the same plan, always.

    `required`: column -> the flag that names it; a Parquet file without one stops planning."""
    entries = [p if isinstance(p, InputFile) else _stat(p) for p in paths]
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        probes = list(pool.map(lambda e: _probe(e, input_format, required or {}), entries))
    byte_total = sum(p.entry.size for p in probes if p.format in ("jsonl", "text") and not p.compressed)
    row_total = sum(p.rows for p in probes) + sum(p.format == "text" for p in probes)
    eff_bytes = min(shard_bytes, max(MIN_SHARD_BYTES, math.ceil(byte_total / TARGET_SHARDS)))
    eff_rows = min(shard_rows, max(MIN_SHARD_ROWS, math.ceil(row_total / TARGET_SHARDS)))

    shards: list[Shard] = []
    text_group: list[str] = []
    text_versions: list[str] = []
    text_group_bytes = 0

    def add(fmt: str, paths: tuple[str, ...], start: int = 0, stop: int = -1, version: str = "") -> None:
        shards.append(Shard(len(shards), fmt, paths, start, stop, version))

    def flush_text() -> None:
        nonlocal text_group, text_group_bytes, text_versions
        if text_group:
            add("text", tuple(text_group), version=";".join(text_versions))
            text_group, text_group_bytes, text_versions = [], 0, []

    for p in probes:
        path, fmt = p.entry.uri, p.format
        if fmt != "text":
            flush_text()
        if fmt in ("parquet", "squad", "json", "mrqa"):
            for start, stop in _ranges(p.rows, eff_rows):
                add(fmt, (path,), start, stop, p.entry.version)
        elif fmt == "jsonl" and not p.compressed:
            for start, stop in _ranges(p.entry.size, eff_bytes):
                add(fmt, (path,), start, stop, p.entry.version)
        elif fmt == "text":
            # One document per file: group small files so a shard is not a single tiny task.
            text_group.append(path)
            text_versions.append(p.entry.version)
            text_group_bytes += p.entry.size
            if text_group_bytes >= eff_bytes or len(text_group) >= eff_rows:
                flush_text()
        elif fmt in ("jsonl", "textblocks", "wikiextractor"):
            add(fmt, (path,), version=p.entry.version)  # read whole: compressed, or records need parsing
        else:
            raise ConfigError(f"unknown input format {fmt!r} for {path}")
    flush_text()
    return shards


def _stat(path: str) -> InputFile:
    entries = list_files(path)
    if len(entries) != 1:
        raise ConfigError(f"{path} is not a single file")
    return entries[0]


# ---------------------------------------------------------------- reading

def _parquet(path: str, size: int | None = None) -> pq.ParquetFile:
    fs, inner = filesystem(path)
    with open_input(path, size) as f:
        if isinstance(f, pa.CompressedInputStream):
            # A compressed Parquet file has to be unpacked before its footer can be read.
            return pq.ParquetFile(pa.BufferReader(f.read()))
    return pq.ParquetFile(inner, filesystem=fs)


def _lines(f: Any, offset: int, stop: int | None) -> Iterator[tuple[int, bytes | bytearray]]:
    """(offset, line) for each line starting before `stop`; linear in the bytes read.

    A line longer than a chunk is gathered in one bytearray grown in place (no pieces joined into a copy),
    and nothing here keeps a line once it is yielded, so a consumer can let a huge line go before it is
    done parsing it."""
    pending: list[bytearray] = []  # at most one: the start of a line whose end is in a later chunk
    while True:
        if stop is not None and offset >= stop and not pending:
            return
        chunk = f.read(_CHUNK)
        if not chunk:
            if pending and (stop is None or offset < stop):
                yield offset, pending.pop()
            return
        begin = 0
        while (nl := chunk.find(b"\n", begin)) >= 0:
            if stop is not None and offset >= stop:
                return
            start = offset
            offset += (len(pending[0]) if pending else 0) + nl - begin + 1
            if pending:
                pending[0] += memoryview(chunk)[begin:nl]
                yield start, pending.pop()
            else:
                yield start, chunk[begin:nl]
            begin = nl + 1
        if begin < len(chunk):
            if not pending:
                pending.append(bytearray())
            pending[0] += memoryview(chunk)[begin:]


def _jsonl_lines(path: str, start: int, stop: int) -> Iterator[tuple[int, bytes | bytearray]]:
    """(byte offset, line) for each line that *starts* in [start, stop): byte-range shards of one file
    cover every line exactly once. stop == -1 streams the whole (possibly compressed) file."""
    if stop < 0:
        with open_input(path) as f:
            yield from _lines(f, 0, None)
        return
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous shard
                while True:
                    chunk = f.read(1 << 16)
                    if not chunk:
                        return
                    nl = chunk.find(b"\n")
                    if nl >= 0:
                        pos += nl + 1
                        break
                    pos += len(chunk)
        f.seek(pos)
        yield from _lines(f, pos, stop)


def content_id(text: Any) -> str:
    """A document id that survives any re-sharding or file split: a hash of the text itself."""
    data = text.encode("utf-8", errors="replace") if isinstance(text, str) else repr(text).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _locate(path: str, where: int | str) -> str:
    return f"{os.path.basename(split_query(path)[0].rstrip('/'))}:{where}"


def _parquet_records(shard: Shard, opts: ReadOptions) -> list[tuple[str, Any, str]]:
    path = shard.paths[0]
    pf = _parquet(path)
    names = set(pf.schema_arrow.names)
    wanted = [opts.text_column, opts.id_column, *opts.extra.get("fields", ())] if opts.kind == "documents" else [
        opts.id_column, opts.question_column, opts.context_column]
    cols = [c for c in dict.fromkeys(wanted) if c in names]
    meta = pf.metadata
    first, groups = 0, []
    for g in range(meta.num_row_groups):
        lo, hi = first, first + meta.row_group(g).num_rows
        if lo < shard.stop and hi > shard.start:
            groups.append((g, lo))
        first = hi
    if not groups or shard.stop <= shard.start:
        return []
    table = pf.read_row_groups([g for g, _ in groups], columns=cols)
    table = table.slice(shard.start - groups[0][1], shard.stop - shard.start)
    columns = {name: _strings(table.column(name)) for name in table.column_names}
    out = []
    for i in range(table.num_rows):
        rec = {name: values[i][0] for name, values in columns.items()}
        err = next((values[i][1] for values in columns.values() if values[i][1]), "")
        out.append((_locate(path, shard.start + i), rec, err))
    return out


def _strings(col: pa.ChunkedArray) -> list[tuple[Any, str]]:
    """(value, error) per row; a string that is not valid UTF-8 (other writers allow it) is an error."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return [(v, "") for v in col.to_pylist()]
    out = []
    for raw in col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary()).to_pylist():
        if raw is None:
            out.append((None, ""))
            continue
        try:
            out.append((raw.decode("utf-8"), ""))
        except UnicodeDecodeError:
            out.append((raw.decode("utf-8", errors="replace"), "invalid_unicode"))
    return out


def read_shard(shard: Shard, opts: ReadOptions) -> list[dict[str, Any]]:
    """All rows of one shard, in a deterministic order.

    A file that breaks while read (a truncated .gz is only noticed at its end) stops the job with one
    line naming it, not a bare stream error."""
    try:
        return _read_shard(shard, opts)
    except OSError as exc:
        raise ConfigError(f"cannot read {shard.paths[0]}: {str(exc).strip().splitlines()[0]} "
                          "(a truncated or corrupt file?); fix or remove it, then run again") from None


def _read_shard(shard: Shard, opts: ReadOptions) -> list[dict[str, Any]]:
    install_filesystems(opts.filesystems)
    records: list[tuple[str, Any, str]] = []  # (locator, record, read error)
    path = shard.paths[0]
    if shard.format == "parquet":
        records = _parquet_records(shard, opts)
    elif shard.format == "jsonl":
        for offset, line in _jsonl_lines(path, shard.start, shard.stop):
            if not line or line.isspace():  # (strip() would copy a huge line)
                continue
            holder = [line]
            del line  # loads_taken lets a huge line go before it builds the text
            rec = loads_taken(holder)
            err = "" if isinstance(rec, dict) else TOO_DEEP if rec is TOO_DEEP else \
                "not_an_object" if rec is not None else "invalid_json"
            records.append((_locate(path, offset), rec if isinstance(rec, dict) else {}, err))
    elif shard.format in ("squad", "mrqa") and opts.kind == "documents":
        # A SQuAD or MRQA file as a corpus: each paragraph once (read by the shard holding its first
        # question), under an id naming its article and position, stable across runs and shard sizes.
        for i, rec, err in parsed(path, shard.version, shard.format)[shard.start:shard.stop]:
            if err:
                records.append((_locate(path, i), rec, err))
            elif rec.get("question_index") == 0:
                title = rec.get("title")
                doc_id = (f"{title}#{rec['paragraph']}" if isinstance(title, str) and title and "paragraph" in rec
                          else content_id(rec.get("context")))
                records.append((_locate(path, i), {opts.text_column: rec.get("context"), opts.id_column: doc_id,
                                                   "title": title}, ""))
    elif shard.format in ("squad", "json", "mrqa"):
        for i, rec, err in parsed(path, shard.version, shard.format)[shard.start:shard.stop]:
            records.append((_locate(path, i), rec, err))
    elif shard.format == "text":
        for p in shard.paths:
            text = read_bytes(p).decode("utf-8", errors="replace")
            records.append((_locate(p, 0), {opts.text_column: text, "context": text}, ""))
    elif shard.format == "textblocks":
        raw = read_bytes(path).decode("utf-8", errors="replace")
        for i, block in enumerate(re.split(r"\n[ \t\r\f\v]*\n", raw)):
            if block.strip():
                records.append((_locate(path, i), {opts.text_column: block.strip("\n")}, ""))
    elif shard.format == "wikiextractor":
        for i, (attrs, body) in enumerate(wikiextractor_docs(read_bytes(path))):
            rec = {opts.text_column: body}
            if "id" in attrs:
                rec[opts.id_column] = attrs["id"]
            for name in ("title", "url"):  # template fields of corpus QA ("Who founded {title}?")
                if name in attrs:
                    rec.setdefault(name, attrs[name])
            records.append((_locate(path, i), rec, ""))
    else:
        raise ValueError(f"unknown shard format {shard.format!r}")

    if opts.kind == "documents":
        return [_document_row(loc, rec, err, opts) for loc, rec, err in records]
    rows: list[dict[str, Any]] = []
    for loc, rec, err in records:
        rows += _question_rows(loc, rec, err, opts)
    return rows


def _clean(value: Any) -> tuple[Any, bool]:
    """(value safe to write, was it valid?): lone surrogates (JSON's "\\ud800") cannot be encoded as UTF-8."""
    if isinstance(value, str) and _SURROGATE.search(value):
        return _SURROGATE.sub("\ufffd", value), False
    return value, True


def _document_row(loc: str, rec: dict[str, Any], err: str, opts: ReadOptions) -> dict[str, Any]:
    text, text_ok = _clean(rec.get(opts.text_column))
    if not err and opts.text_column not in rec:
        err = "missing_text_column"
    doc_id, id_ok = _clean(rec.get(opts.id_column))
    if not err and not (text_ok and id_ok):
        err = "invalid_unicode"
    doc_id = str(doc_id) if doc_id is not None else (content_id(text) if not err else loc)
    # A record that could not be read is not mined (its text would be a guess); its reason is counted.
    row = {"doc_id": doc_id, "text": text if isinstance(text, str) and not err else None, "_error": err}
    if "fields" in opts.extra:
        # Corpus QA's template fields, as one JSON object (absent fields are absent: that pair's error).
        values = {name: _clean(rec[name])[0] for name in opts.extra["fields"] if name in rec and rec[name] is not None}
        row["fields"] = json.dumps(values, default=str, ensure_ascii=False)
    return row


def _question_rows(loc: str, rec: dict[str, Any], err: str, opts: ReadOptions) -> list[dict[str, Any]]:
    rid, id_ok = _clean(rec.get(opts.id_column))
    rid = str(rid) if rid is not None else loc
    context, context_ok = _clean(rec.get(opts.context_column))
    context = context if isinstance(context, str) else None
    question = rec.get(opts.question_column)
    if not err and opts.question_column not in rec:
        err = "missing_question_column"
    if not err and opts.context_column not in rec:
        err = "missing_context_column"
    if not err and not (id_ok and context_ok):
        err = "invalid_unicode"
    if err:  # an unreadable record is one error row, with no question to answer
        return [{"id": rid, "question": question if isinstance(question, str) and err != "invalid_unicode"
                 else None, "context": None if err == "invalid_unicode" else context, "_error": err}]
    questions = question if isinstance(question, list) else [question]
    if not questions:
        return [{"id": rid, "question": None, "context": context, "_error": "no_questions"}]
    rows = []
    for k, q in enumerate(questions):
        # One context, many questions: one output row per question, ids suffixed by position.
        q, q_ok = _clean(q)
        # A missing scalar question is the stage's to name (missing_question); in a list it is not a string.
        listed = isinstance(question, list)
        q_err = "question_not_string" if not isinstance(q, str) and (listed or q is not None) else "" if q_ok \
            else "invalid_unicode"
        rows.append({"id": f"{rid}#{k}" if listed else rid,
                     "question": q if isinstance(q, str) and not q_err else None,
                     "context": context, "_error": q_err})
    return rows
