"""Where bytes live: local paths and URIs (`file://`, `s3://`, `gs://`...) through pyarrow filesystems.

- One filesystem client per process for each (scheme, bucket, query string), created on first use and
  reused for every file: creating an S3 client can cost a request (region lookup) and a TLS handshake.
- URI query strings configure the client (`s3://bucket/key?endpoint_override=host:9000&scheme=http`)
  and are kept on every file found under that URI, so workers build the same client.
- Credentials: pyarrow's usual chain (environment, ~/.aws, instance role). Static keys in the
  driver's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) are bound into
  the client, so the clients the driver ships with a job (`export_filesystems`) work on workers that
  lack them; AWS_ENDPOINT_URL is honoured the same way.
- Listing is one recursive listing per input argument; globs use the same rules locally and remotely
  (`*`, `?` and `[...]` stay within one path component, `**` spans any depth), and names starting with
  `.` or `_` (hidden files, `_SUCCESS`, `__splinter__/`, Spark's `_temporary/`) are skipped unless
  named explicitly.
- Compressed files (gzip, bzip2, zstd) are recognised by their first bytes, not only their name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.paths import is_uri
from pipeline.settings import ConfigError

_QUERY = re.compile(r"[A-Za-z_][\w.]*=[^&/]*(?:&[A-Za-z_][\w.]*=[^&/]*)*")
_LOCAL = pafs.LocalFileSystem()
_CLIENTS: dict[str, pafs.FileSystem] = {}

# Suffix -> pyarrow codec; content sniffing (`sniff_codec`) finds misnamed files too.
CODEC_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}


def split_query(uri: str) -> tuple[str, str]:
    """('s3://b/k', 'endpoint_override=h:1') for 's3://b/k?endpoint_override=h:1'.

    Only a trailing `?key=value&...` counts as a query, so a `?` glob in a path stays a glob."""
    if not is_uri(uri):
        return uri, ""
    for i, ch in enumerate(uri):
        if ch == "?" and _QUERY.fullmatch(uri[i + 1:]):
            return uri[:i], uri[i + 1:]
    return uri, ""


def _static_credentials(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 client holding the environment's static keys, so that it still works once pickled to a
    worker whose environment lacks them."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not isinstance(fs, pafs.S3FileSystem) or not key or not secret:
        return fs
    rebuild, (options,) = fs.__reduce__()
    if options.get("access_key") or options.get("anonymous"):
        return fs  # the URI named its own credentials
    options = {**options, "access_key": key, "secret_key": secret,
               "session_token": os.environ.get("AWS_SESSION_TOKEN")}
    return rebuild(options)


def _client_key(uri: str) -> tuple[str, str, str]:
    """(cache key, scheme, path inside the store) of a remote URI: one client per bucket and query string."""
    base, query = split_query(uri)
    scheme, rest = base.split("://", 1)
    netloc, _, path = rest.partition("/")
    # `s3://KEY:SECRET@bucket/...` names its own credentials: they select the client, never the path.
    bucket = netloc.rsplit("@", 1)[-1]
    return f"{scheme}://{netloc}?{query}", scheme, f"{bucket}/{path}".rstrip("/")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; one cached client per bucket and query."""
    if not is_uri(path):
        return _LOCAL, os.path.abspath(path)
    if path.startswith("file://"):
        return pafs.FileSystem.from_uri(split_query(path)[0])
    key, scheme, inner = _client_key(path)
    if key not in _CLIENTS:
        netloc, query = key.split("://", 1)[1].split("?", 1)
        try:
            fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}" + (f"?{query}" if query else ""))
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise ConfigError(f"cannot open {path}: {_first_line(exc)}") from None
        _CLIENTS[key] = _static_credentials(fs)
    if scheme in ("s3", "gs", "gcs"):
        return _CLIENTS[key], inner
    return _CLIENTS[key], pafs.FileSystem.from_uri(split_query(path)[0])[1]


def export_filesystems(paths: Iterable[str]) -> dict[str, pafs.FileSystem]:
    """The driver's clients for these locations, to ship with a job (see `install_filesystems`)."""
    out: dict[str, pafs.FileSystem] = {}
    for path in paths:
        if is_uri(path) and not path.startswith("file://"):
            key = _client_key(path)[0]
            if key not in out:
                filesystem(path)
                out[key] = _CLIENTS[key]
    return out


def install_filesystems(clients: dict[str, pafs.FileSystem] | None) -> None:
    """Use the clients a job shipped (a worker then needs neither credentials nor a region lookup)."""
    for key, fs in (clients or {}).items():
        _CLIENTS[key] = fs


def location(base: str, inner: str) -> str:
    """The user-facing location of `inner` (a path inside the filesystem of `base`), query kept."""
    if not is_uri(base):
        return inner
    uri, query = split_query(base)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return f"file://{inner}"
    netloc = rest.split("/", 1)[0]
    userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
    return f"{scheme}://{userinfo}{inner}" + (f"?{query}" if query else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------- listing

@dataclass(frozen=True)
class InputFile:
    """A file found by listing: its location and what defines its content (size, modification time)."""

    uri: str
    size: int
    mtime_ns: int

    @property
    def version(self) -> str:
        return f"{self.size}:{self.mtime_ns}"


def _entry(base: str, info: pafs.FileInfo) -> InputFile:
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return InputFile(location(base, info.path), int(info.size or 0), int(mtime))


def _skipped(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over '/'-separated paths: `*`, `?`, `[...]` within one component, `**` any depth.

    Wildcards never match a leading `.` or `_` of a component (hidden and metadata names)."""
    out, i, n = [], 0, len(pattern)
    at_start = True  # at the start of a path component
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**/", i) and at_start:
            out.append(r"(?:[^/._][^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i) and at_start and i + 2 == n:
            out.append(r"(?:[^/._][^/]*/)*[^/._][^/]*")
            i += 2
            continue
        if ch == "*":
            out.append(r"(?![._])[^/]*" if at_start else r"[^/]*")
        elif ch == "?":
            out.append(r"[^/._]" if at_start else r"[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[]", i) else i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = end
        else:
            out.append(re.escape(ch))
        at_start = ch == "/"
        i += 1
    return re.compile("".join(out))


def _local_walk(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Files under a local directory. Directory symlinks are not followed (a loop such as `sub/back -> ..`
    cannot hang the walk, and `up -> ..` cannot lead out of the root); a file symlink is read only when
    its target lies inside the root, and each real file once, however many names it has."""
    real_root = os.path.realpath(root)
    by_real: dict[str, str] = {}  # real path -> the name it is read under
    for top, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            real = os.path.realpath(path)
            link = os.path.islink(path)
            if link and os.path.commonpath([real_root, real]) != real_root:
                continue  # a link out of the input root
            if not os.path.isfile(real):
                continue  # a dangling link
            # The file's own name wins over a link to it, whichever the walk meets first.
            if real not in by_real or (not link and os.path.islink(by_real[real])):
                by_real[real] = path
    paths = sorted(by_real.values())
    return fs.get_file_info(paths) if paths else []


def list_files(item: str, exclude: str | None = None) -> list[InputFile]:
    """Files named by a path, a directory (walked recursively) or a glob; one listing each."""
    fs, inner = filesystem(item)
    skip_root = None
    if exclude:
        excluded_fs, excluded = filesystem(exclude)
        local = isinstance(fs, pafs.LocalFileSystem) and isinstance(excluded_fs, pafs.LocalFileSystem)
        skip_root = excluded.rstrip("/") + "/" if excluded_fs is fs or local else None
    wild = [inner.find(ch) for ch in "*?[" if ch in inner]
    try:
        if wild:
            first = min(wild)
            if "/" not in inner[:first]:
                raise ConfigError(f"{item}: a glob needs a fixed directory (or bucket) before its first wildcard")
            root = inner[:first].rsplit("/", 1)[0] or "/"
            deep = "/" in inner[first:] or "**" in inner
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=deep, allow_not_found=True))
            regex = glob_regex(inner)
            found = [i for i in infos if i.type == pafs.FileType.File and regex.fullmatch(i.path)]
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"input not found: {item}")
            if info.type == pafs.FileType.Directory and isinstance(fs, pafs.LocalFileSystem):
                infos = _local_walk(fs, inner)
            elif info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            if info.type == pafs.FileType.Directory:
                found = [i for i in infos if i.type == pafs.FileType.File
                         and not _skipped(i.path[len(inner.rstrip('/')) + 1:])]
            else:
                found = [info]
    except OSError as exc:
        raise ConfigError(f"cannot list {item}: {_first_line(exc)}") from None
    if skip_root:
        found = [i for i in found if not i.path.startswith(skip_root)]
    return sorted((_entry(item, i) for i in found), key=lambda e: e.uri)


# ---------------------------------------------------------------- reading

def sniff_codec(head: bytes) -> str | None:
    """gzip, bz2 or zstd from a file's first bytes; None for anything else."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if len(head) >= 10 and head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


def strip_codec_suffix(path: str) -> str:
    """'corpus.jsonl.gz' -> 'corpus.jsonl' (query strings dropped): the name that tells the format."""
    name = split_query(path)[0].lower()
    for suffix in CODEC_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_input(path: str, size: int | None = None) -> Any:
    """A readable stream of the file's content, decompressed when its first bytes say it is compressed.

    `size` (from a listing) is accepted for callers that know it; pyarrow looks it up itself."""
    del size
    fs, inner = filesystem(path)
    raw = fs.open_input_file(inner)
    head = raw.read(10)
    raw.seek(0)
    codec = sniff_codec(head)
    return pa.CompressedInputStream(raw, codec) if codec else raw


def is_compressed(path: str) -> bool:
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        return sniff_codec(f.read(10)) is not None


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_head(path: str, n: int, size: int | None = None) -> bytes:
    """Up to n bytes of the (decompressed) content."""
    with open_input(path, size) as f:
        return f.read(n)
