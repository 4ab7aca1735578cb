"""Whether a path names object storage (or any URI) or the local disk: one rule for every layer."""

from __future__ import annotations

import re

__all__ = ["is_uri"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(path: str) -> bool:
    """`s3://b/k`, `gs://...`, `file:///x`: a URI; anything else is a local path."""
    return bool(_SCHEME.match(path))
