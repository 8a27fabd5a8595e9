"""What the benchmark scripts share: gwsync imported from this checkout, and a throw-away config."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_config(workdir: Path, accounts: str = "") -> Path:
    """`workdir/config.toml` with the CRM and state databases in `workdir`, plus `accounts` (TOML)."""
    path = workdir / "config.toml"
    path.write_text(f'[crm]\ndatabase = "{workdir}/crm.db"\n[state]\ndatabase = "{workdir}/state.db"\n{accounts}')
    return path


def imap_account(server, user: str, settings: str = "") -> str:
    """The account "bench" on a local Dovecot user over plain IMAP; `settings` are TOML lines
    for [accounts.bench] itself (e.g. "interval = 600")."""
    return (f'[accounts.bench]\n{settings}\n[accounts.bench.imap]\nhost = "127.0.0.1"\nport = {server.port}\n'
            f'security = "none"\nusername = "{user}"\npassword = "{server.password_for(user)}"\n')
