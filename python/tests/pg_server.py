"""A throwaway PostgreSQL server for the idempotency tests (as the Rust
tests' ``pg_support``): Debian's server binaries (``$PG_BIN_DIR``, else the
newest ``/usr/lib/postgresql/<version>/bin``), ``initdb`` into a temporary
directory, ``pg_ctl`` on a free port of 127.0.0.1, stopped at the end. As
root, both run as the ``postgres`` user (PostgreSQL refuses root).

Without the binaries the tests that need it skip, saying why; under CI
(``CI`` set) they fail instead, since ``.ci/deps`` installs them."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin_dir() -> Path | None:
    env = os.environ.get("PG_BIN_DIR")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None
    root = Path("/usr/lib/postgresql")
    found = [
        (int(p.name), p / "bin")
        for p in (root.iterdir() if root.is_dir() else [])
        if p.name.isdigit() and (p / "bin" / "initdb").is_file()
    ]
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """A running server; ``stop()`` ends it and removes its directory."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) not found in $PG_BIN_DIR or "
                "/usr/lib/postgresql/*/bin: run `bash .ci/deps` to install Debian's postgresql"
            )
        self._bin = bin_dir
        self._run_as: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="xzepr-py-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError("running as root and no `postgres` user") from exc
            os.chown(self._dir, user.pw_uid, user.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self._data = self._dir / "data"
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "-A", "trust")
        last = ""
        # A free port can be taken before the server binds it: try a few.
        for _ in range(5):
            self.port = _free_port()
            opts = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            log = str(self._dir / "server.log")
            try:
                self._run("pg_ctl", "-D", str(self._data), "-l", log, "-o", opts, "-w", "start")
                return
            except RuntimeError as exc:
                last = str(exc)
        self.stop()
        raise RuntimeError(f"pg_ctl start failed: {last}")

    @property
    def dsn(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._run_as, str(self._bin / tool), *args],
            capture_output=True,
            text=True,
            cwd=self._dir,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")
