"""Input corpora: find files, cut them into deterministic shards, read a shard into rows.

A shard is the unit of work, commit and resume. Shards are planned on the driver from file
metadata only (sizes, Parquet row groups), so planning stays cheap however big the corpus is,
and the plan never depends on how many workers run it.

Two row kinds come out of a shard:
- "documents" (mining): `doc_id`, `text`;
- "questions" (QA): `id`, `question`, `context`.
Every row also carries `_error`: "" or why the source record could not be read (invalid JSON,
missing column...). Such rows still flow to the output so that every record is accounted for.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import ConfigError

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson")
_DOC_OPEN = re.compile(rb'^<doc\b([^>]*)>', re.M)
_ATTR = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Shard:
    index: int
    format: str
    paths: tuple[str, ...]
    start: int = 0  # row group / byte offset / row, by format
    stop: int = -1

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shard:
        return cls(int(d["index"]), str(d["format"]), tuple(d["paths"]), int(d["start"]), int(d["stop"]))


@dataclass(frozen=True)
class ReadOptions:
    """How records become rows; the same object travels to every reading worker."""

    kind: str  # "documents" | "questions"
    text_column: str = "text"
    id_column: str = "id"
    question_column: str = "question"
    context_column: str = "context"
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- filesystems

def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands (file://, s3://, gs://)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _join(base_uri: str, inner: str) -> str:
    """Rebuild a user-facing location for `inner` (a path inside the filesystem of `base_uri`)."""
    if "://" not in base_uri:
        return inner
    return f"{base_uri.split('://', 1)[0]}://{inner}"


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by paths, directories (recursive) and globs, sorted so the shard plan is stable."""
    found: list[str] = []
    for item in inputs:
        fs, inner = filesystem(item)
        if any(ch in inner for ch in "*?["):
            if "://" not in item:
                found += sorted(p for p in glob.glob(inner, recursive=True) if os.path.isfile(p))
                continue
            root = inner[: min(inner.find(ch) for ch in "*?[" if ch in inner)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            found += sorted(_join(item, i.path) for i in infos
                            if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, inner))
            continue
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"input not found: {item}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            found += sorted(
                _join(item, i.path) for i in infos
                if i.type == pafs.FileType.File and not os.path.basename(i.path).startswith((".", "_"))
            )
        else:
            found.append(item if "://" in item else inner)
    if not found:
        raise ConfigError(f"no input files found in: {', '.join(inputs)}")
    return found


def _head(path: str, n: int = 4096) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read(n)


def detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(PARQUET_EXT):
        return "parquet"
    if lower.endswith(JSONL_EXT):
        return "jsonl"
    head = _head(path)
    if lower.endswith(".json"):
        # SQuAD files are one JSON object with a "data" list; JSON-lines files have an object per line.
        try:
            obj = json.loads(head.split(b"\n", 1)[0])
        except ValueError:
            return "squad" if head.lstrip().startswith(b"{") else "jsonl"
        return "squad" if isinstance(obj, dict) and isinstance(obj.get("data"), list) else "jsonl"
    if head.lstrip().startswith(b"<doc"):
        return "wikiextractor"
    return "text"


# ---------------------------------------------------------------- planning

def plan_shards(paths: list[str], input_format: str, shard_rows: int, shard_bytes: int) -> list[Shard]:
    """Cut the files into shards. Same files and settings give the same plan, always."""
    shards: list[Shard] = []
    text_group: list[str] = []
    text_group_bytes = 0

    def flush_text() -> None:
        nonlocal text_group, text_group_bytes
        if text_group:
            shards.append(Shard(len(shards), "text", tuple(text_group)))
            text_group, text_group_bytes = [], 0

    for path in paths:
        fmt = detect_format(path) if input_format == "auto" else input_format
        fs, inner = filesystem(path)
        if fmt == "parquet":
            flush_text()
            meta = pq.ParquetFile(inner, filesystem=fs).metadata
            start, rows = 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= shard_rows:
                    shards.append(Shard(len(shards), fmt, (path,), start, g + 1))
                    start, rows = g + 1, 0
            if start < meta.num_row_groups or meta.num_row_groups == 0:
                shards.append(Shard(len(shards), fmt, (path,), start, meta.num_row_groups))
        elif fmt == "jsonl":
            flush_text()
            size = fs.get_file_info(inner).size or 0
            for start in range(0, max(size, 1), shard_bytes):
                shards.append(Shard(len(shards), fmt, (path,), start, min(start + shard_bytes, size)))
        elif fmt == "squad":
            flush_text()
            n = sum(1 for _ in _squad_records(path))
            for start in range(0, max(n, 1), shard_rows):
                shards.append(Shard(len(shards), fmt, (path,), start, min(start + shard_rows, n)))
        elif fmt == "text":
            # One document per file: group small files so a shard is not a single tiny task.
            size = fs.get_file_info(inner).size or 0
            text_group.append(path)
            text_group_bytes += size
            if text_group_bytes >= shard_bytes or len(text_group) >= shard_rows:
                flush_text()
        elif fmt in ("textblocks", "wikiextractor"):
            flush_text()
            shards.append(Shard(len(shards), fmt, (path,)))
        else:
            raise ConfigError(f"unknown input format {fmt!r} for {path}")
    flush_text()
    return shards


# ---------------------------------------------------------------- reading

def _read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def _jsonl_lines(path: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for each line that *starts* in [start, stop): the usual split rule,
    so byte-range shards of one file cover every line exactly once."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # we are mid-line: that line belongs to the previous shard
                pos = start
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
        buf = b""
        offset = pos
        while offset < stop or buf:
            nl = buf.find(b"\n")
            if nl < 0:
                chunk = f.read(1 << 20)
                if chunk:
                    buf += chunk
                    continue
                if buf and offset < stop:
                    yield offset, buf
                return
            line, buf = buf[:nl], buf[nl + 1:]
            if offset >= stop:
                return
            yield offset, line
            offset += nl + 1


def _squad_records(path: str) -> Iterator[dict[str, Any]]:
    data = json.loads(_read_bytes(path))
    for article in data.get("data", []):
        for para in article.get("paragraphs", []):
            context = para.get("context")
            for qa in para.get("qas", []):
                yield {"id": qa.get("id"), "question": qa.get("question"), "context": context,
                       "title": article.get("title")}


def _wikiextractor_docs(raw: bytes) -> Iterator[tuple[dict[str, str], str]]:
    text = raw.decode("utf-8", errors="replace")
    for block in text.split("<doc")[1:]:
        head, _, body = block.partition(">")
        body = body.split("</doc>", 1)[0].strip("\n")
        # The authors drop the first line of each doc: wikiextractor repeats the title there.
        lines = body.split("\n")
        yield dict(_ATTR.findall(head)), "\n".join(lines[1:])


def content_id(text: Any) -> str:
    """A document id that survives any re-sharding or file split: a hash of the text itself."""
    data = text.encode("utf-8", errors="replace") if isinstance(text, str) else repr(text).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _locate(path: str, where: int | str) -> str:
    return f"{os.path.basename(path.rstrip('/'))}:{where}"


def read_shard(shard: Shard, opts: ReadOptions) -> list[dict[str, Any]]:
    """All rows of one shard, in a deterministic order."""
    records: list[tuple[str, Any, str]] = []  # (locator, record, read error)
    path = shard.paths[0]
    if shard.format == "parquet":
        fs, inner = filesystem(path)
        pf = pq.ParquetFile(inner, filesystem=fs)
        names = set(pf.schema_arrow.names)
        wanted = [opts.text_column, opts.id_column] if opts.kind == "documents" else [
            opts.id_column, opts.question_column, opts.context_column]
        cols = [c for c in dict.fromkeys(wanted) if c in names]
        first = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start))
        if shard.stop > shard.start:
            table = pf.read_row_groups(list(range(shard.start, shard.stop)), columns=cols)
            for i, rec in enumerate(table.to_pylist()):
                records.append((_locate(path, first + i), rec, ""))
    elif shard.format == "jsonl":
        for offset, line in _jsonl_lines(path, shard.start, shard.stop):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8", errors="replace"))
                err = "" if isinstance(rec, dict) else "not_an_object"
            except ValueError:
                rec, err = None, "invalid_json"
            records.append((_locate(path, offset), rec if isinstance(rec, dict) else {}, err))
    elif shard.format == "squad":
        for i, rec in enumerate(_squad_records(path)):
            if shard.start <= i < shard.stop:
                records.append((_locate(path, i), rec, ""))
    elif shard.format == "text":
        for p in shard.paths:
            text = _read_bytes(p).decode("utf-8", errors="replace")
            records.append((_locate(p, 0), {opts.text_column: text, "context": text}, ""))
    elif shard.format == "textblocks":
        raw = _read_bytes(path).decode("utf-8", errors="replace")
        for i, block in enumerate(re.split(r"\n[ \t\r\f\v]*\n", raw)):
            if block.strip():
                records.append((_locate(path, i), {opts.text_column: block.strip("\n")}, ""))
    elif shard.format == "wikiextractor":
        for i, (attrs, body) in enumerate(_wikiextractor_docs(_read_bytes(path))):
            rec = {opts.text_column: body}
            if "id" in attrs:
                rec[opts.id_column] = attrs["id"]
            records.append((_locate(path, i), rec, ""))
    else:
        raise ValueError(f"unknown shard format {shard.format!r}")

    if opts.kind == "documents":
        return [_document_row(loc, rec, err, opts) for loc, rec, err in records]
    rows: list[dict[str, Any]] = []
    for loc, rec, err in records:
        rows += _question_rows(loc, rec, err, opts)
    return rows


def _document_row(loc: str, rec: dict[str, Any], err: str, opts: ReadOptions) -> dict[str, Any]:
    text = rec.get(opts.text_column)
    if not err and opts.text_column not in rec:
        err = "missing_text_column"
    doc_id = rec.get(opts.id_column)
    doc_id = str(doc_id) if doc_id is not None else (content_id(text) if not err else loc)
    return {"doc_id": doc_id, "text": text if isinstance(text, str) else None, "_error": err}


def _question_rows(loc: str, rec: dict[str, Any], err: str, opts: ReadOptions) -> list[dict[str, Any]]:
    rid = rec.get(opts.id_column)
    rid = str(rid) if rid is not None else loc
    context = rec.get(opts.context_column)
    question = rec.get(opts.question_column)
    if not err and opts.question_column not in rec:
        err = "missing_question_column"
    if not err and opts.context_column not in rec:
        err = "missing_context_column"
    context = context if isinstance(context, str) else None
    if isinstance(question, list) and not err:
        # One context, many questions: one output row per question, ids suffixed by position.
        if not question:
            return [{"id": rid, "question": None, "context": context, "_error": "no_questions"}]
        return [{"id": f"{rid}#{k}", "question": q if isinstance(q, str) else None, "context": context,
                 "_error": "" if isinstance(q, str) else "question_not_string"} for k, q in enumerate(question)]
    if question is not None and not isinstance(question, str) and not err:
        err = "question_not_string"
    return [{"id": rid, "question": question if isinstance(question, str) else None, "context": context,
             "_error": err}]
