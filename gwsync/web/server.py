"""Running the web view: the listening socket (waitress), its secret key and its logins (one
shared password, or one per employee from [serve.users.NAME]; each read once, at the start)."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import PASSWORD_KEYS_TEXT, Config, ConfigError, http_address
from ..storage.sqlite import ensure_private_dir
from .app import create_app, is_loopback

LOGINS = f"a password in [serve] ({PASSWORD_KEYS_TEXT}) or a login per employee ([serve.users.NAME])"


class ServeError(Exception):
    """The server cannot start (the port is taken, say); one line for the user."""


def secret_key(directory: Path) -> bytes:
    """The key that signs session cookies and CSRF tokens, kept beside the state database so
    that logins and open forms survive a restart. Readable by the owner only."""
    ensure_private_dir(directory)
    path = directory / "web-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)  # a truncated file from a crash: renew
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


def make_server(config: Config, host: str, port: int):
    """A waitress server for the web view, bound but not yet serving. A login (a password in
    [serve], or [serve.users.NAME]) is required to listen beyond loopback."""
    from waitress.server import create_server

    password = config.serve.secret.resolve() if config.serve.secret else None
    users = {name: user.secret.resolve() for name, user in config.serve.users.items()}  # the config allows one kind
    public = urlsplit(config.serve.url).hostname if config.serve.url else None
    if password is None and not users and not is_loopback(host):
        raise ConfigError(
            f"serve: listening on {host} makes the CRM reachable from other machines; set "
            f"{LOGINS}, or use --host 127.0.0.1")
    if password is None and not users and public and not is_loopback(public):
        raise ConfigError(
            f"serve.url {config.serve.url} says the CRM is opened from other machines (through a proxy); "
            f"set {LOGINS}")
    app = create_app(config, secret_key(config.state_database.parent), password, users)
    try:
        # Four threads answer requests; they share the app's stores (see gwsync/web/app.py).
        server: Any = create_server(app, host=host, port=port, threads=4, ident="gwsync",
                                    clear_untrusted_proxy_headers=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ServeError(f"cannot listen on {host} port {port}: {reason} "
                         f"(another gwsync serve? choose another with --port)") from None
    server.gwsync_stores = app.extensions["gwsync.stores"]  # run_server closes them when it stops
    return server


def run_server(server, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or Ctrl-C, then close the socket."""
    def stop(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    on_ready(http_address(server.effective_host, server.effective_port) + "/")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        stores = getattr(server, "gwsync_stores", None)
        if stores is not None:
            stores.close()
        signal.signal(signal.SIGTERM, previous)
