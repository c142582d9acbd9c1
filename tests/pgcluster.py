"""A throwaway PostgreSQL cluster that the tests start and stop themselves.

The task server's PostgreSQL backend is tested against a real server, but
`make test` must need no running service, no password and no port of the
machine's own cluster (Debian's is on 5432, if it runs at all): ``PgCluster``
runs Debian's server binaries (``/usr/lib/postgresql/<major>/bin``, not on
PATH; the newest major) on a free port of 127.0.0.1, with its sockets and data
in a fresh folder under /tmp, removed at ``stop()``.

PostgreSQL refuses to run as root, so as root it runs as the system user
``dsagent-pg`` (created when missing) through ``runuser``; otherwise as the
current user. The folder is made under /tmp, mode 0755, because pytest's
tmp_path is not reachable by another user (/tmp/pytest-of-root is 0700),
the same reason as ``Lab.public_dir`` in tests/pxelab.py.

Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
the data is thrown away, and a test must not wait on the disk. A missing
binary raises ``MissingPostgres`` naming the Debian package: tests that need
the cluster fail, never skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

PACKAGE = "postgresql"
SERVICE_USER = "dsagent-pg"
SERVER_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


class MissingPostgres(RuntimeError):
    def __init__(self, what: str):
        super().__init__(f"{what} not found: install the Debian package {PACKAGE} "
                         f"(apt-get install {PACKAGE}, or `make setup` as root)")


def server_bin() -> Path:
    """The bin folder of the newest PostgreSQL major installed (15 before 9.6)."""
    found = [initdb.parent for initdb in SERVER_ROOT.glob("*/bin/initdb")
             if all((initdb.parent / tool).exists() for tool in ("pg_ctl", "postgres"))]
    if not found:
        raise MissingPostgres(f"{SERVER_ROOT}/<major>/bin/initdb, pg_ctl, postgres")
    return max(found, key=lambda bin_dir: [int(n) for n in bin_dir.parent.name.split(".")])


def run_as_user() -> str | None:
    """The user the server runs as when we are root (created if missing), else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home",
                               "--shell", "/usr/sbin/nologin", SERVICE_USER],
                              capture_output=True, text=True)
        try:
            pwd.getpwnam(SERVICE_USER)   # a parallel run may have made it first
        except KeyError:
            raise RuntimeError(f"useradd {SERVICE_USER} failed: {made.stderr.strip()}") from None
    return SERVICE_USER


def exited(process: psutil.Process) -> bool:
    """Whether ``process`` has exited. A zombie has: the postmaster is an orphan
    after pg_ctl, and pid 1 may reap orphans only every second or two."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


class PgCluster:
    """``with PgCluster() as cluster: psycopg.connect(cluster.dsn("postgres"))``."""

    def __init__(self):
        self.bin = server_bin()
        self.version = self.bin.parent.name
        self.user = run_as_user()
        self.port = 0
        self.base: Path | None = None
        self.start_seconds = 0.0

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, str(self.bin / tool), *args], cwd=self.base,
                              capture_output=True, text=True, timeout=120)

    def _check(self, tool: str, *args: str) -> None:
        done = self._run(tool, *args)
        if done.returncode:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}"
                               f"{log}")

    def start(self) -> PgCluster:
        began = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix="dsagent-pg-", dir="/tmp"))
        self.base.chmod(0o755)
        if self.user:
            shutil.chown(self.base, self.user, self.user)
        self.port = free_port()
        try:
            self._check("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER,
                        "--no-sync", "-E", "UTF8", "--locale=C")
            initdb_seconds = time.monotonic() - began
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                       "-c max_connections=200")
            self._check("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                        "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        print(f"\nPostgreSQL {self.version} on 127.0.0.1:{self.port} as "
              f"{self.user or pwd.getpwuid(os.geteuid()).pw_name}: started in "
              f"{self.start_seconds:.2f} s (initdb {initdb_seconds:.2f} s)")
        return self

    @property
    def pid(self) -> int:
        """The postmaster's pid (first line of postmaster.pid)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended), wait until its
        process is gone, and remove its folder."""
        if self.base is None:
            return
        if (self.data / "postmaster.pid").exists():
            postmaster = psutil.Process(self.pid)
            self._check("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            deadline = time.monotonic() + 30   # pg_ctl returns once the pid file is gone
            while not exited(postmaster):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres {postmaster.pid} still runs 30 s after stop")
                time.sleep(0.01)
        shutil.rmtree(self.base)
        self.base = None

    def dsn(self, dbname: str = SUPERUSER) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, statement: str, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))

    def create_database(self, name: str) -> str:
        """Create database ``name``; its DSN."""
        self._admin("CREATE DATABASE {}", name)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending any session still on it."""
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
