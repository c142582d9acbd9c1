"""An image store at an http(s) URL: the layout of a local store, served by
any web server that serves files (with Range) and takes ``PUT``.

    <url>/<name>/current                  the version id in use
    <url>/<name>/<version>/data.zst       (the same files as on disk:
    <url>/<name>/<version>/index.bin       an image captured locally can be
    <url>/<name>/<version>/meta.json       copied to a web server as is)

Deploy: ``current`` and ``meta.json`` are fetched whole; ``index.bin`` is
streamed into a spooled temporary file and checked against the metadata's
``image_sha256`` before any of it is used; ``data.zst`` is streamed by one
ranged GET read ahead in a thread, resumed where it stopped if the
connection drops (httpio.RangeReader); every frame is verified by deploy.py
before its runs are written.

Capture: ``data.zst`` is PUT as it is compressed (one streamed request),
then ``index.bin``, then ``meta.json``: the version is complete only when its
metadata is there, and a capture that fails stops before it. Last, ``current``
is PUT: the image switches to the new version. There is no lock over HTTP
(two captures of one name each write their own version; the last ``current``
wins) and nothing is deleted (older versions and a failed capture's partial
data stay on the server, unused: a web server need not take DELETE).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from array import array
from itertools import groupby
from typing import Any, Iterator
from urllib.parse import urlsplit

from handlers.imaging.httpio import RangeReader, Session, Upload, blocks, split_credentials
from handlers.imaging.store import (FORMAT, INDEX_RECORD, INDEX_TRAILER, VERSION_RE, Chunk,
                                    ImageError, IndexWriter, check_name, read_index, version_id)

MAX_META_BYTES = 16 << 20
SPOOL_BYTES = 16 << 20          # an index up to this size stays in memory


class HttpImageStore:
    """The image store at ``url`` (``http://`` or ``https://``, user:password allowed)."""

    def __init__(self, url: str):
        clean, _auth = split_credentials(url)
        parts = urlsplit(clean)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image_store {clean!r} is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ImageError(f"image_store {clean!r}: a URL with a query or fragment is not "
                             "a folder of images")
        self.location = url if url.endswith("/") else url + "/"
        self.base = clean if clean.endswith("/") else clean + "/"

    def __str__(self) -> str:
        return self.base

    def folder_url(self, name: str) -> str:
        return f"{self.base}{check_name(name)}/"

    def session(self) -> Session:
        return Session(self.location)

    # ---- reading -----------------------------------------------------------
    def open_current(self, name: str) -> "HttpImageVersion":
        """The complete version in use, or ImageError (missing, incomplete, unreachable)."""
        folder = self.folder_url(name)
        session = self.session()
        try:
            raw = session.get_bytes(folder + "current", 1024, f"image '{name}': ")
            if raw is None:
                status = session.head_status(folder)
                if status == 404:
                    raise ImageError(f"image '{name}' does not exist in {self.base} "
                                     f"(no {folder}current, no folder {folder})")
                raise ImageError(f"image '{name}' is not complete: {folder}current is missing "
                                 "(its capture did not finish)")
            version = raw.decode("utf-8", "replace").strip()
            if not VERSION_RE.fullmatch(version):
                raise ImageError(f"image '{name}': {folder}current names {version[:80]!r}, "
                                 "not a version of this image; refused")
            vurl = f"{folder}{version}/"
            meta_raw = session.get_bytes(vurl + "meta.json", MAX_META_BYTES, f"image '{name}': ")
            if meta_raw is None:
                raise ImageError(f"image '{name}' is not complete: {vurl}meta.json is missing "
                                 "(its upload did not finish)")
            return HttpImageVersion(session, name, version, vurl, meta_raw)
        except BaseException:
            session.close()
            raise

    # ---- writing -----------------------------------------------------------
    def begin_capture(self, name: str) -> "HttpCapture":
        return HttpCapture(self, name)


class HttpImageVersion:
    """A complete version on the server, opened for deploy."""

    def __init__(self, session: Session, name: str, version: str, url: str, meta_raw: bytes):
        self.session, self.name, self.version, self.url = session, name, version, url
        self._spool: Any = None
        self._frames = (array("Q"), array("Q"))    # each frame's offset and length in data.zst
        try:
            self.meta: dict[str, Any] = json.loads(meta_raw)
        except ValueError as exc:
            raise ImageError(f"{url}meta.json is not valid JSON: {exc}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise ImageError(f"{url}: unknown image format "
                             f"{self.meta.get('format') if isinstance(self.meta, dict) else None!r}")
        if self.meta.get("version", version) != version:
            raise ImageError(f"{url}meta.json is the metadata of version "
                             f"{self.meta.get('version')!r}, not of {version}; refused")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def _int(self, key: str) -> int:
        value = self.meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ImageError(f"{self.url}meta.json: {key} is {value!r}, not a byte count")
        return value

    def chunks(self) -> Iterator[Chunk]:
        """Fetch the index whole (spooled), check it against image_sha256, note
        where each frame is (so data.zst is fetched frame by frame, ahead of
        the writer), then stream it."""
        url = self.url + "index.bin"
        size = INDEX_TRAILER.size + self._int("runs") * INDEX_RECORD.size
        reader = RangeReader(self.session, url, size, f"image '{self.name}'")
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        digest = hashlib.sha256()
        try:
            for offset, length in blocks(size):
                block = reader.read(offset, length)
                digest.update(block)
                self._spool.write(block)
        finally:
            reader.close()
        if digest.hexdigest() != self.meta.get("image_sha256"):
            raise ImageError(f"{url} does not match the image checksum (corrupt or altered index)")
        offsets, lengths = self._frames
        for data_offset, runs in groupby(read_index(self._spool, url), key=lambda c: c.data_offset):
            offsets.append(data_offset)
            lengths.append(next(runs).comp_length)
        return read_index(self._spool, url)

    def open_data(self) -> RangeReader:
        """data.zst, read ahead frame by frame in the order deploy.py asks for them
        (the frames are known once ``chunks()`` has fetched the index)."""
        if self._spool is None:
            raise ImageError("open_data() before chunks(): the frames are not known yet")
        return RangeReader(self.session, self.url + "data.zst", self._int("compressed_size"),
                           f"image '{self.name}'", zip(*self._frames, strict=True))

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
        self.session.close()


class HttpCapture:
    """A capture uploaded to the server: data, index, metadata, then ``current``."""

    def __init__(self, store: HttpImageStore, name: str):
        self.name = name
        self.folder = store.folder_url(name)
        self.version = version_id()
        self.url = f"{self.folder}{self.version}/"
        self.session = store.session()
        self._upload: Upload | None = None
        self._index: IndexWriter | None = None
        try:  # the server is there (TLS, credentials for reads), and what we replace
            raw = self.session.get_bytes(self.folder + "current", 1024, f"image '{name}': ")
        except BaseException:
            self.session.close()
            raise
        previous = raw.decode("utf-8", "replace").strip() if raw else ""
        self.previous = previous if VERSION_RE.fullmatch(previous) else None

    def data(self) -> Upload:
        self._upload = Upload(self.session, self.url + "data.zst")
        return self._upload

    def index(self, frame_bytes: int) -> IndexWriter:
        self._index = IndexWriter(tempfile.TemporaryFile(), frame_bytes, fsync=False)
        return self._index

    def commit(self, meta: dict) -> dict:
        """PUT index.bin, then meta.json (the version is complete), then ``current``."""
        if self._index is not None:
            fh = self._index.file
            self.session.put_bytes(self.url + "index.bin", fh, fh.seek(0, 2))
        body = json.dumps(meta, indent=1).encode()
        self.session.put_bytes(self.url + "meta.json", body, len(body))
        self.session.put_bytes(self.folder + "current", (self.version + "\n").encode(),
                               len(self.version) + 1)
        return {"replaced_versions": [], "previous_version": self.previous,
                "image_url": self.url, "http_retries": self.session.retries}

    def abort(self) -> None:
        if self._upload is not None:
            self._upload.abort()

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
        self.session.close()
