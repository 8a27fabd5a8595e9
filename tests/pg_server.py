"""A throwaway PostgreSQL for the tests: a cluster in a temporary directory, on a free port, with
its Unix socket in that directory, started in its own session and stopped with its process group.

Order of work: find the binaries (PATH, then Debian's /usr/lib/postgresql/N/bin), make the
directory, initdb (trust authentication, UTF-8 with a UTF-8 ctype so that lower() folds every
letter), start `postgres` in the foreground as our child, wait until it answers.

PostgreSQL refuses to run as root. Under root (CI on a fresh machine) the cluster runs as the
`postgres` user that Debian's package creates (else `nobody`): the temporary directory is made
below /tmp, which every user can traverse, and given to that user; the binaries run with
subprocess's user/group switch, so no runuser or sudo is needed.

Durability is off (fsync, synchronous_commit, full_page_writes): the data dies with the test.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from gwsync.demo.localservers import ServerUnavailable, free_port, stop_process_group

SUPERUSER = "gwsync"  # the cluster's superuser (initdb -U), with trust authentication


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise ServerUnavailable(f"{name} not found: install Debian's postgresql package (scripts/test does)")


def _server_user() -> pwd.struct_passwd | None:
    """None: run as ourselves. Under root, an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailable("running as root and neither a postgres nor a nobody user exists")


class PostgresServer:
    def __init__(self, directory: Path, port: int, user: pwd.struct_passwd | None):
        self.directory = directory
        self.port = port
        self.user = user
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)

    @property
    def socket_dir(self) -> Path:
        return self.directory

    def url(self, database: str = "postgres", socket: bool = False) -> str:
        """postgresql://gwsync@127.0.0.1:PORT/DB (TCP), or with ?host=SOCKETDIR (the Unix socket)."""
        url = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return url + f"?host={self.socket_dir}" if socket else url

    def _run_as(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    @classmethod
    def start(cls) -> PostgresServer:
        user = _server_user()
        directory = Path(tempfile.mkdtemp(prefix="gwsync-pg-", dir="/tmp"))
        server = cls(directory, free_port(), user)
        try:
            if user is not None:
                os.chown(directory, user.pw_uid, user.pw_gid)  # 0700, now the server user's
            server._initdb()
            server._launch()
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self) -> None:
        done = subprocess.run(
            [_binary("initdb"), "-D", str(self.directory / "data"), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, cwd="/", **self._run_as())
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {done.stderr.strip()[-2000:]}")

    def _launch(self) -> None:
        log = self.directory / "postgres.log"
        # Opened here (as root, if we are) and handed over: the server user need not create it.
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [_binary("postgres"), "-D", str(self.directory / "data"), "-p", str(self.port),
                 "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/", **self._run_as())
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"postgres exited with {self.proc.returncode}: "
                                        f"{log.read_text(errors='replace')[-2000:]}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"postgres did not answer on port {self.port} within 30 s")
            time.sleep(0.05)

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def execute(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]  # tests' own, fixed text

    def new_database(self, prefix: str = "test") -> str:
        """A fresh, empty database (a copy of template0); returns its name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)  # SIGTERM: PostgreSQL's "smart" shutdown, then SIGKILL
            self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
