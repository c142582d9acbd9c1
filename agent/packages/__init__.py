"""The package server (issue #15): a site server serves its driver packages and
its images read-only over HTTP, so that it can be the source of truth of a
package for other site servers' ReplicatePackage tasks. ``dsagent run``
starts it when the config has ``[packages]``. See docs/package-server.md.

- stores.py    which ids and paths of a store may be served (nothing hidden,
               nothing resolving outside its package)
- manifests.py the manifest of a package that has none: hashed once, in a thread;
               an image lists only its current, complete version
- service.py   the HTTP routes (Starlette), uvicorn, the status file
- checks.py    dsagent doctor's row
"""
