"""ReplicatePackage (PROTOCOL.md §4), as an ordinary handler plugin.

Parameters: ``package`` (the id), ``kind`` (``driver``: into ``[handlers]
package_store``; ``image``: into ``[handlers] image_store``, a folder), and
``source`` (the http(s) URL of the package's folder at its source of truth,
ending in ``/``). The manifest is fetched and checked before anything is
written; then the files missing or different here are fetched (resumed,
verified), the unchanged ones linked from the version in place, and the
package switched whole (handlers/replication/replica.py). A manifest that is
gone (404) deletes the package here. ``[handlers] replication_kbps`` paces the
downloads (0: no limit).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from urllib.parse import urlsplit

import httpx

from agent.plugin import BadParameters, Param, Progress, TaskFailed, TaskType, hookimpl

from handlers.replication.fetch import FetchError, Fetcher, Pacer
from handlers.replication.manifest import MAX_MANIFEST, ManifestError, parse_manifest
from handlers.replication.replica import Replica

TASK_TYPE = "ReplicatePackage"
STORES = {"driver": "package_store", "image": "image_store"}
PARAMETERS = (
    Param("package", required=True, pattern=r"[A-Za-z0-9._-]{1,128}",
          description="the package id ([A-Za-z0-9._-], 1-128)"),
    Param("kind", required=True, pattern="driver|image",
          description="driver (into package_store) or image (into image_store)"),
    Param("source", required=True, description="http(s) URL of the package's folder at its "
                                               "source of truth, ending in /"),
)
HTTP_TIMEOUT_S = 30.0


@hookimpl
def dsagent_task_types(register):
    register(TaskType(TASK_TYPE, default_timeout=6 * 3600, parameters=PARAMETERS,
                      description="make a driver package or an image equal to its source"))


@hookimpl
def dsagent_validate_task(task, config):
    if task.type != TASK_TYPE:
        return
    params = task.parameters
    if params["package"] in (".", ".."):
        raise BadParameters(f"package {params['package']!r} is not allowed")
    key = STORES[params["kind"]]
    store = config.get(key)
    if not store:
        raise BadParameters(f"{TASK_TYPE} of a {params['kind']} needs [handlers] {key}")
    if "://" in store or not os.path.isdir(store):
        raise BadParameters(f"[handlers] {key} {store} is not a folder on this machine "
                            "(a package replicates into a folder)")
    parts = urlsplit(params["source"])
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or not parts.path.endswith("/"):
        raise BadParameters(f"source {params['source']!r} is not an http(s) URL of a folder "
                            "(ending in /, no query)")


@hookimpl
def dsagent_run_task(task, ctx):
    if task.type != TASK_TYPE:
        return None
    params = task.parameters
    store = ctx.config[STORES[params["kind"]]]
    try:
        return replicate(store, params["package"], params["source"], ctx)
    except (ManifestError, FetchError) as exc:
        raise TaskFailed(f"package '{params['package']}': {exc}") from None
    except OSError as exc:
        what = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or exc
        raise TaskFailed(f"package '{params['package']}': {exc.filename or store}: {what}; the "
                         "version in place is unchanged") from None


def replicate(store: str, package: str, source: str, ctx) -> dict:
    started = time.monotonic()
    replica = Replica(store, package)
    with httpx.Client(timeout=HTTP_TIMEOUT_S, follow_redirects=False,
                      headers={"Accept-Encoding": "identity"}) as http:
        manifest = _manifest(http, source)
        if manifest is None:
            existed = replica.delete()
            ctx.log.warning("package '%s' is gone from its source %s: %s", package, source,
                            "deleted here" if existed else "there was none here")
            return {"package": package, "deleted": existed, "files": 0}
        files = parse_manifest(manifest, package)
        digest = hashlib.sha256(manifest).hexdigest()   # what the server knows it by
        total = sum(f.size for f in files)
        in_place = replica.in_place(files)
        if replica.unchanged(files, in_place, manifest):
            ctx.progress(100, "already up to date")
            return {"package": package, "files": len(files), "bytes_fetched": 0,
                    "bytes_reused": total, "unchanged": True, "manifest_sha256": digest}
        current, staging = replica.current(), replica.start()
        fetched = reused = resumed = 0
        fetched_files: list[str] = []
        moved = Progress(total, ctx.progress, "fetched or reused").add
        pacer = Pacer(int(ctx.config.get("replication_kbps") or 0))
        with Fetcher(source, pacer, moved, ctx.cancelled) as fetcher:
            for f in files:
                target = staging / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.path in in_place:
                    os.link(current / f.path, target)
                    reused += f.size
                    moved(f.size)
                    continue
                partial = replica.partial / f.sha256
                got, was_resumed = fetcher.fetch(f, partial)
                os.replace(partial, target)
                fetched += got
                resumed += was_resumed
                fetched_files.append(f.path)
        version = replica.switch(staging, manifest)
    ctx.log.info("package '%s' replicated from %s: version %s, %d file(s) fetched, %d reused",
                 package, source, version, len(fetched_files), len(files) - len(fetched_files))
    return {"package": package, "version": version, "files": len(files),
            "files_fetched": fetched_files[:100], "bytes_fetched": fetched,
            "bytes_reused": reused, "resumed": resumed, "manifest_sha256": digest,
            "duration_s": round(time.monotonic() - started, 3)}


def _manifest(http: httpx.Client, source: str) -> bytes | None:
    """The manifest's bytes, None if the source says it is gone (404)."""
    url = source + "manifest.json"
    try:
        with http.stream("GET", url) as response:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise FetchError(f"{url}: HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise ManifestError(f"{url} is larger than {MAX_MANIFEST >> 20} MiB")
            return bytes(body)
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
