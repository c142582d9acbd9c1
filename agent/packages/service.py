"""The package server (``python -m agent.packages --config FILE``), started by
``dsagent run`` only when the config has ``[packages]``: this site server's
driver packages and images, read-only over HTTP, so that it can be the source
of truth of a package for other site servers' ReplicatePackage tasks.

    GET|HEAD /drivers/<id>/<path>    <package_store>/<id>/<path>
    GET|HEAD /images/<id>/<path>     <image_store>/<id>/<path> (image_store a folder)
    GET /drivers/<id>/manifest.json  its own (a replica's), byte for byte, or generated
    GET /  /drivers/  /images/       the package ids, JSON (for support)

What may be served is stores.py's rule; generated manifests are
manifests.py's. Files go out with Starlette's FileResponse (Range → 206, 416,
HEAD, ETag), so ReplicatePackage resumes a cut download where it stopped.

Why Starlette and uvicorn: the reference server already uses them
(taskserver/asgi.py), FileResponse does ranges right, and the event loop
serves many slow replicas at once; hashing runs in worker threads.

Hashes are cached in memory; a warm-up thread makes every generated manifest
at start and again every ``WARM_EVERY_S`` (cheap once cached: a stat a file),
so a replica's first request rarely waits for a large image to be read.

Logs: not a line a request; errors, manifests generated (when a package's
manifest differs from the one served before), packages not offered (once a
reason), paths left out of a manifest (once).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from agent.common.config import Config
from agent.common.errors import DsagentError
from agent.common.statusfile import StatusFile
from agent.packages.manifests import Changing, HashCache, Made, NotOffered, make_manifest
from agent.packages.stores import Store

log = logging.getLogger("dsagent.packages")

WARM_EVERY_S = 300.0
GRACE_S = 5            # uvicorn's graceful stop: the supervisor waits 20 s per child
KEEP_ALIVE_S = 30      # ReplicatePackage fetches a package's files on one connection
MAX_CONNECTIONS = 512  # beyond: 503 (a replica retries; the site server keeps working)
RETRY_AFTER_S = 5
NOT_OFFERED_RETRY_S = 60      # an image not complete yet: ask again in a minute
NAMES = {"drivers": "driver package", "images": "image"}


def stores_of(config: Config) -> dict[str, Store]:
    """The stores this site server serves: ``[handlers] package_store``, and
    ``image_store`` when it is a folder (an http(s) store is not ours to serve)."""
    stores = {}
    packages, images = (config.get("handlers", k) for k in ("package_store", "image_store"))
    if packages:
        stores["drivers"] = Store("drivers", packages)
    if images and "://" not in images:
        stores["images"] = Store("images", images)
    return stores


def text(status: int, message: str, **headers: str):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(message + "\n", status_code=status, headers=headers or None)


class PackageServer:
    def __init__(self, config: Config):
        self.stores = stores_of(config)
        self.listen = config.get("packages", "listen")
        self.cache = HashCache()
        self.stop = threading.Event()
        self.status = StatusFile(config.state_dir, "packages")
        self.served: dict[tuple[str, str], str] = {}    # sha256 of each manifest served
        self.said: dict[tuple[str, str], str] = {}      # the last reason logged, per package
        self.generated = 0
        self.warm_thread: threading.Thread | None = None

    # ---- the routes -----------------------------------------------------------------
    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/", self.index, methods=["GET"]),
            Route("/{kind}/", self.listing, methods=["GET"]),
            Route("/{kind}/{pid}/{path:path}", self.package_file, methods=["GET"]),
        ])

    async def index(self, request):
        from anyio import to_thread
        from starlette.responses import JSONResponse

        ids = await to_thread.run_sync(lambda: {k: s.ids() for k, s in self.stores.items()})
        return JSONResponse(ids)

    async def listing(self, request):
        from anyio import to_thread
        from starlette.responses import JSONResponse

        kind = request.path_params["kind"]
        store = self.stores.get(kind)
        if store is None:
            return text(404, f"no {kind} store on this site server")
        return JSONResponse({kind: await to_thread.run_sync(store.ids)})

    async def package_file(self, request):
        from anyio import to_thread
        from starlette.responses import FileResponse

        kind, pid, rel = (request.path_params[k] for k in ("kind", "pid", "path"))
        store = self.stores.get(kind)
        if store is None:
            return text(404, f"no {kind} store on this site server")
        what, found = await to_thread.run_sync(self.lookup, store, pid, rel)
        if what == "missing":
            return text(404, found)
        if what == "generate":
            return await self.generated_manifest(store, pid, found)
        path, st = found
        media = "application/json" if what == "own manifest" else "application/octet-stream"
        return FileResponse(path, stat_result=st, media_type=media)

    def lookup(self, store: Store, pid: str, rel: str) -> tuple[str, Any]:
        """What a request names: ``("file"|"own manifest", (path, stat))``,
        ``("generate", package folder)`` or ``("missing", why)``."""
        name = NAMES[store.kind]
        package = store.package(pid)
        if package is None:
            return "missing", f"no {name} {pid!r} here"
        if rel == "manifest.json":
            if store.own_manifest(package) is None:
                return "generate", package
        found = store.file(package, rel)
        if found is None:
            return "missing", f"{name} {pid!r} has no file {rel!r} to serve"
        return ("own manifest" if rel == "manifest.json" else "file"), found

    async def generated_manifest(self, store: Store, pid: str, package: str):
        from anyio import to_thread
        from starlette.responses import Response

        key = (store.kind, pid)
        try:
            made, skipped = await to_thread.run_sync(make_manifest, store.kind, pid, package,
                                                     self.cache)
        except NotOffered as exc:
            self._say(key, logging.INFO, str(exc))     # 503, not 404: a 404 deletes replicas
            return text(503, str(exc), **{"Retry-After": str(NOT_OFFERED_RETRY_S)})
        except Changing as exc:
            self._say(key, logging.WARNING, f"{exc}; answered 503, retry in {RETRY_AFTER_S} s")
            return text(503, str(exc), **{"Retry-After": str(RETRY_AFTER_S)})
        except OSError as exc:
            message = f"{NAMES[store.kind]} '{pid}': cannot make its manifest: {exc}"
            self._say(key, logging.ERROR, message)
            self.status.update(last_error={"message": message, "at": time.time()})
            return text(500, message)
        self._generated(store, pid, made, skipped)
        return Response(made.body, media_type="application/json")

    # ---- logs and status --------------------------------------------------------------
    def _say(self, key: tuple[str, str], level: int, message: str) -> None:
        """Log ``message`` unless it is the last thing said of this package."""
        if self.said.get(key) != message:
            self.said[key] = message
            log.log(level, "%s", message)

    def _generated(self, store: Store, pid: str, made: Made, skipped: list[str]) -> None:
        key = (store.kind, pid)
        if skipped:
            self._say(key, logging.WARNING, f"{NAMES[store.kind]} '{pid}': left out of its "
                      f"manifest (hidden, or a path ReplicatePackage refuses): "
                      f"{', '.join(map(repr, skipped[:10]))}"
                      + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
        else:
            self.said.pop(key, None)
        digest = hashlib.sha256(made.body).hexdigest()
        if self.served.get(key) != digest:
            self.served[key] = digest
            self.generated += 1
            log.info("manifest of %s '%s' generated: %d file(s), %d bytes (%d newly "
                     "hashed) in %.2f s", NAMES[store.kind], pid, made.files, made.size,
                     made.hashed, made.seconds)
            self.status.update(manifests_generated=self.generated, last_generated={
                "kind": store.kind, "id": pid, "files": made.files, "bytes": made.size,
                "at": time.time()})

    # ---- the warm-up ------------------------------------------------------------------
    def warm(self) -> None:
        """Hash every file a generated manifest lists (once, then only what changed)."""
        started, hashed, count = time.monotonic(), 0, 0
        for store in self.stores.values():
            for pid in store.ids():
                if self.stop.is_set():
                    return
                package = store.package(pid)
                if package is None or store.own_manifest(package) is not None:
                    continue
                try:
                    made, _ = make_manifest(store.kind, pid, package, self.cache)
                except (NotOffered, Changing, OSError):
                    continue       # said when a replica asks for it
                hashed += made.hashed
                count += 1
        if hashed:
            log.info("hashed %d bytes for the manifests of %d package(s) in %.1f s",
                     hashed, count, time.monotonic() - started)

    def _warm_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.warm()
            except Exception:      # a bug here must not stop the serving
                log.exception("warming the manifest hashes failed")
            self.stop.wait(WARM_EVERY_S)

    # ---- the process --------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        import uvicorn

        for name in ("uvicorn", "uvicorn.error"):     # its start and stop lines: ours say it
            logging.getLogger(name).setLevel(logging.WARNING)
        server = uvicorn.Server(uvicorn.Config(
            self.app(), log_config=None, access_log=False, proxy_headers=False,
            server_header=False, lifespan="off", timeout_graceful_shutdown=GRACE_S,
            timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS))
        port = sock.getsockname()[1]
        stores = {k: str(s.root) for k, s in self.stores.items()}
        for kind, root in stores.items():
            if not os.path.isdir(root):
                log.warning("the %s store %s is not a folder (yet): nothing to serve there",
                            NAMES[kind], root)
        self.status.update(serving=True, listen=self.listen, port=port, stores=stores)
        log.info("package server listening on %s (port %d): %s", self.listen, port,
                 ", ".join(f"/{k}/ from {r}" for k, r in stores.items()))
        self.warm_thread = threading.Thread(target=self._warm_loop, name="warm", daemon=True)
        self.warm_thread.start()
        # uvicorn takes SIGTERM/SIGINT while it serves, then raises the signal again
        # for the handler it found: ours, so that close() still runs
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])

    def close(self) -> None:
        self.stop.set()
        self.status.update(serving=False, stopped_at=time.time())
        self.status.close()


def listen_socket(address: tuple[str, int]) -> socket.socket:
    """The listening socket (bound here, so that a taken port is said plainly)."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    from agent.common import process
    from agent.common.config import parse_hostport

    try:
        config = process.start("packages", argv, "python -m agent.packages")
        server = PackageServer(config)
        listen = server.listen
        address = parse_hostport(listen, f"{config.path}: [packages] listen")
    except (DsagentError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if not server.stores:    # run by hand without [packages] (which checks this)
        log.error("%s: nothing to serve: set [handlers] package_store, or image_store to a "
                  "folder", config.path)
        server.close()
        return 2
    try:
        sock = listen_socket(address)
    except OSError as exc:
        log.error("cannot listen on %s ([packages] listen): %s", listen, exc.strerror or exc)
        server.close()
        return 2
    try:
        server.serve(sock)
    finally:
        server.close()
        sock.close()
    log.info("package server stopped; %d manifest(s) generated", server.generated)
    return 0

