"""The URL store: image URLs gemframe has fetched, so a rerun fetches none of them again.

It lives in the cache directory (``<cache>/urls``), a store of its own through the same hardened
diskcache as the answers (`disk`: raw bytes only, never unpickled, no link followed, 0700/0600):

- ``url:<URL>`` -> a JSON record: the image's digest, MIME type, size, its validators (ETag,
  Last-Modified) and when it was fetched;
- ``img:<digest>`` -> the image's bytes, stored once however many URLs serve them.

The digest is the one cache keys use for inline data (sha256 of the base64 text the API
receives, `key._data_digest`): a request's key can be computed from the record alone, so a
cached rerun (or ``cache="read"`` with the network off) reads neither the network nor the bytes.
Bytes read back are checked against their digest; a record or image that is not as gemframe
writes them is a miss.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from ..._files import atomic_write
from .disk import (
    _cache_method,
    open_store,
    read_entries,
    reporting_corruption,
)

_RECORD = "url:"
_IMAGE = "img:"
_BATCH = 500
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
URL_EXPORT_COLUMNS = ("url", "mime", "etag", "last_modified", "fetched_at", "data")


def data_digest(encoded: str) -> str:
    """The digest of inline data (its base64 text), as `key._data_digest` computes it for keys."""
    return "sha256:" + hashlib.sha256(encoded.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class UrlRecord:
    """What the store remembers of one image URL."""

    url: str
    digest: str  # data_digest of the image's base64 text
    mime: str
    size: int  # bytes
    etag: str | None
    last_modified: str | None
    fetched_at: float  # epoch seconds of the last fetch (or revalidation)


def _record(url: str, raw: bytes) -> UrlRecord | None:
    """A stored record, or None if it is not one gemframe wrote (hostile ground)."""
    try:
        fields = orjson.loads(raw)
        record = UrlRecord(
            url=url, **{k: fields[k] for k in ("digest", "mime", "size", "etag", "last_modified", "fetched_at")}
        )
    except (ValueError, TypeError, KeyError):
        return None
    ok = (
        type(record.digest) is str
        and _DIGEST.fullmatch(record.digest) is not None
        and type(record.mime) is str
        and type(record.size) is int
        and isinstance(record.fetched_at, (int, float))
        and all(v is None or type(v) is str for v in (record.etag, record.last_modified))
    )
    return record if ok else None


class UrlStore:
    """Image URL -> digest, validators and bytes (stored once per digest), in a directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self._store = open_store(self.directory)

    def __repr__(self) -> str:
        return f"UrlStore({self.directory!r})"

    @_cache_method
    def lookup(self, urls: Iterable[str]) -> dict[str, UrlRecord]:
        """The records of the URLs whose image is stored (one query per 500 URLs)."""
        entries, _ = read_entries(self._store, [_RECORD + url for url in urls])
        records = {}
        for key, raw in entries.items():
            record = _record(key[len(_RECORD) :], raw)
            if record is not None:
                records[record.url] = record
        images = self._present({r.digest for r in records.values()})
        return {url: r for url, r in records.items() if r.digest in images}

    def _present(self, digests: Iterable[str]) -> set[str]:
        keys = [_IMAGE + d for d in digests]
        present: set[str] = set()
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            query = f"SELECT key FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(chunk))})"
            present.update(key[len(_IMAGE) :] for (key,) in self._store._sql(query, chunk).fetchall())
        return present

    @_cache_method
    def put(
        self, url: str, data: bytes, mime: str, etag: str | None = None, last_modified: str | None = None
    ) -> UrlRecord:
        """Remember a fetched image (its bytes once per digest); returns its record."""
        digest = data_digest(base64.b64encode(data).decode("ascii"))
        record = UrlRecord(url, digest, mime, len(data), etag, last_modified, time.time())
        with self._store.transact():
            if not self._present([digest]):
                self._store.set(_IMAGE + digest, data)
            self._store.set(_RECORD + url, _dump(record))
        return record

    @_cache_method
    def touch(self, record: UrlRecord) -> UrlRecord:
        """A revalidated record (the server said 304 Not Modified): fetched now."""
        fresh = UrlRecord(**{**asdict(record), "fetched_at": time.time()})
        self._store.set(_RECORD + record.url, _dump(fresh))
        return fresh

    @_cache_method
    def encoded(self, digest: str) -> str | None:
        """An image's base64 text (as sent inline), or None when it is gone or is not the image
        its digest names (damaged or planted)."""
        entries, _ = read_entries(self._store, [_IMAGE + digest])
        data = entries.get(_IMAGE + digest)
        if data is None:
            return None
        encoded = base64.b64encode(data).decode("ascii")
        return encoded if data_digest(encoded) == digest else None

    # -- management: gemframe cache stats / clear / export / import ----------------------------

    @_cache_method
    def stats(self) -> dict[str, Any]:
        """URLs remembered, distinct images, and the bytes of those images."""
        urls, oldest, newest = self._store._sql(
            "SELECT COUNT(*), MIN(store_time), MAX(store_time) FROM Cache WHERE key LIKE 'url:%'"
        ).fetchone()
        images, size = self._store._sql(
            "SELECT COUNT(*), SUM(size + COALESCE(LENGTH(value), 0)) FROM Cache WHERE key LIKE 'img:%'"
        ).fetchone()
        return {
            "directory": self.directory,
            "urls": urls,
            "images": images,
            "image_bytes": int(size or 0),
            "oldest": oldest,
            "newest": newest,
        }

    @_cache_method
    def clear(self, *, before: float | None = None) -> int:
        """Forget every URL, or those fetched before a time (epoch seconds), and the images no
        remaining URL serves. Returns how many URLs were forgotten."""
        self._store.check_intact()
        if before is None:
            count: int = self._store._sql("SELECT COUNT(*) FROM Cache WHERE key LIKE 'url:%'").fetchone()[0]
            self._store.clear()
            return count
        old = [
            k
            for (k,) in self._store._sql(
                "SELECT key FROM Cache WHERE key LIKE 'url:%' AND store_time < ?", (before,)
            ).fetchall()
        ]
        for start in range(0, len(old), _BATCH):
            with self._store.transact():
                for key in old[start : start + _BATCH]:
                    self._store.delete(key)
        kept = {r.digest for r in self._records()}
        unused = [
            k
            for (k,) in self._store._sql("SELECT key FROM Cache WHERE key LIKE 'img:%'").fetchall()
            if k[len(_IMAGE) :] not in kept
        ]
        with self._store.transact():
            for key in unused:
                self._store.delete(key)
        return len(old)

    def _records(self) -> Iterator[UrlRecord]:
        keys = [
            k for (k,) in self._store._sql("SELECT key FROM Cache WHERE key LIKE 'url:%' ORDER BY rowid").fetchall()
        ]
        for start in range(0, len(keys), _BATCH):
            entries, _ = read_entries(self._store, keys[start : start + _BATCH])
            for key, raw in entries.items():
                record = _record(key[len(_RECORD) :], raw)
                if record is not None:
                    yield record

    def export(self, path: str | os.PathLike[str]) -> int:
        """Write every URL with its image to a parquet file (``URL_EXPORT_COLUMNS``); returns
        the count. Written next to ``path`` and renamed when complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("url", pa.string()),
                ("mime", pa.string()),
                ("etag", pa.string()),
                ("last_modified", pa.string()),
                ("fetched_at", pa.float64()),
                ("data", pa.large_binary()),
            ]
        )
        count = 0
        with (
            reporting_corruption(self.directory),
            atomic_write(path) as partial,
            pq.ParquetWriter(partial, schema) as writer,
        ):
            rows: list[dict[str, Any]] = []
            for record in self._records():
                encoded = self.encoded(record.digest)
                if encoded is None:
                    continue
                rows.append(
                    {
                        "url": record.url,
                        "mime": record.mime,
                        "etag": record.etag,
                        "last_modified": record.last_modified,
                        "fetched_at": record.fetched_at,
                        "data": base64.b64decode(encoded),
                    }
                )
                if len(rows) == 100:  # images: a few MB per batch
                    writer.write_table(pa.Table.from_pylist(rows, schema))
                    count, rows = count + len(rows), []
            writer.write_table(pa.Table.from_pylist(rows, schema))
            count += len(rows)
        return count

    def import_(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Any]:
        """Merge an exported URL file. Every row is checked as a fetched image is: an http(s)
        URL, at most the inline limit, bytes that sniff as a supported image (the MIME type and
        digest are computed here, never taken from the file). A URL already stored is kept
        unless ``overwrite``. Returns ``{"added", "replaced", "kept", "refused"}``."""
        import pyarrow.parquet as pq

        from ..payload import INLINE_LIMIT, sniff_mime

        source = pq.ParquetFile(os.fspath(path))
        missing = [c for c in URL_EXPORT_COLUMNS if c not in source.schema_arrow.names]
        if missing:
            raise ValueError(f"{os.fspath(path)} is not a gemframe URL store export: no columns {missing}")
        counts = {"added": 0, "replaced": 0, "kept": 0, "refused": 0}
        for batch in source.iter_batches(batch_size=100, columns=list(URL_EXPORT_COLUMNS)):
            for row in batch.to_pylist():
                url, data = row["url"], row["data"]
                ok = (
                    type(url) is str
                    and re.match(r"(?i)https?://", url) is not None
                    and type(data) is bytes
                    and len(data) <= INLINE_LIMIT
                    and all(row[k] is None or type(row[k]) is str for k in ("etag", "last_modified"))
                )
                mime = sniff_mime(data) if ok else None
                if mime is None:
                    counts["refused"] += 1
                    continue
                present = bool(self.lookup([url]))
                if present and not overwrite:
                    counts["kept"] += 1
                    continue
                counts["replaced" if present else "added"] += 1
                self.put(url, data, mime, row["etag"], row["last_modified"])
        return counts

    def close(self) -> None:
        self._store.close()


def _dump(record: UrlRecord) -> bytes:
    fields = asdict(record)
    del fields["url"]  # the key holds it
    return orjson.dumps(fields)
