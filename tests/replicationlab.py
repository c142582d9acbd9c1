"""A package's source of truth for the replication tests: a folder served
over HTTP with Range, and faults on the wire on demand."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

PKG = "nic-e1000"


class Source:
    """A source of truth: a folder served over HTTP with Range, and faults on demand
    (``cut[path] = n``: close after n bytes once; ``corrupt[path] = k``: flip a
    byte in the next k answers)."""

    def __init__(self, root: Path):
        self.root = root
        self.cut: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self.bytes_sent = 0
        source = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.translate_path(self.path)
                rel = os.path.relpath(path, root)
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                data = Path(path).read_bytes()
                start = 0
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-")[0])
                body = bytearray(data[start:])
                if source.corrupt.get(rel, 0) > 0 and body:
                    source.corrupt[rel] -= 1
                    body[len(body) // 2] ^= 0xFF
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = source.cut.pop(rel, None)
                out = bytes(body if limit is None else body[:limit])
                self.wfile.write(out)
                source.bytes_sent += len(out)
                if limit is not None:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, package: str = PKG) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{package}/"

    def write(self, files: dict[str, bytes], package: str = PKG) -> None:
        """The package's files and its manifest at the source."""
        folder = self.root / package
        shutil.rmtree(folder, ignore_errors=True)
        for path, data in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        manifest = {"id": package, "files": [
            {"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for p, d in files.items()]}
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def source(tmp_path):
    """A source of truth in ``tmp_path/source`` (import this fixture into a test module)."""
    s = Source(tmp_path / "source")
    s.root.mkdir()
    yield s
    s.server.shutdown()
