"""Mail import speed and memory, next to the raw IMAP cost of the same work.

    python benchmarks/mail_import.py [--mails 10000] [--attachment-mb 50]

Starts a throw-away Dovecot, and for each scenario prints:
  - gwsync: wall time of `gwsync sync` in a child process, mails per second, and its peak
    memory (ru_maxrss of the child);
  - raw: the same mails fetched (BODY.PEEK[] in batches) and moved with plain imapclient,
    without parsing or writing anything, as the floor the server and the protocol set.
Targets (issue 2): at least 1,000 mails/s on loopback; peak memory under 200 MB whatever
the attachment size. Figures only; no assertion: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imapclient import IMAPClient

from _setup import ROOT, imap_account, write_config
from gwsync.demo.localservers import Dovecot

FOLDER = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"


def small_mail(n: int) -> bytes:
    return (f"From: Sender {n % 50} <sender{n % 50}@example.org>\r\nTo: alice@example.com\r\n"
            f"Subject: Benchmark mail {n}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0100\r\n"
            f"Message-ID: <bench{n}@example.org>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello,\r\n\r\nthis is benchmark mail number {n}.\r\n\r\nRegards\r\n").encode()


def big_mail(megabytes: int) -> bytes:
    blob = os.urandom(megabytes << 20)
    encoded = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    return (b"From: big@example.org\r\nSubject: Big attachment\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"See attachment.\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=big.bin\r\n\r\n"
            + encoded + b"--b--\r\n")


def seed(server: Dovecot, user: str, messages: list[bytes]) -> None:
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False)
    client.login(user, server.password_for(user))
    for folder in (FOLDER,):
        if not client.folder_exists(folder):
            client.create_folder(folder)
    for start in range(0, len(messages), 500):
        client.multiappend(FOLDER, messages[start:start + 500])
    client.logout()


def raw_fetch_and_move(server: Dovecot, user: str) -> float:
    """Fetch every mail whole (in the same batches gwsync uses) and move it: no parsing, no CRM."""
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False)
    client.login(user, server.password_for(user))
    if not client.folder_exists(ARCHIVE):
        client.create_folder(ARCHIVE)
    start = time.perf_counter()
    client.select_folder(FOLDER)
    uids = client.search(["ALL"])
    for i in range(0, len(uids), 250):
        batch = uids[i:i + 250]
        client.fetch(batch, ["BODY.PEEK[]"])
        client.move(batch, ARCHIVE)
    elapsed = time.perf_counter() - start
    client.logout()
    return elapsed


def run_gwsync(server: Dovecot, user: str, workdir: Path) -> tuple[float, float, str]:
    config = write_config(workdir, imap_account(server, user))
    # A tiny wrapper reports the child's own peak RSS: VmHWM belongs to the address space that
    # exec created (ru_maxrss would carry over the parent's peak across fork + exec).
    code = ("import re, sys\nfrom gwsync.cli import main\n"
            "try:\n    main(['--config', sys.argv[1], '-q', 'sync'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('MAXRSS', hwm, file=sys.stderr)\nsys.exit(rc)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - start
    maxrss = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS")), 0)
    errors = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("MAXRSS"))
    return elapsed, maxrss / 1024, errors


def scenario(server: Dovecot, name: str, messages_factory, count: int) -> None:
    user_g, user_r = f"{name}-gw", f"{name}-raw"
    messages = messages_factory()
    megabytes = sum(len(m) for m in messages) / 1e6
    seed(server, user_g, messages)
    seed(server, user_r, messages)
    del messages
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, peak_mb, errors = run_gwsync(server, user_g, Path(tmp))
    raw = raw_fetch_and_move(server, user_r)
    print(f"{name}: {count} mail(s), {megabytes:.1f} MB")
    print(f"  gwsync sync    : {elapsed:6.2f} s  {count / elapsed:7.1f} mails/s  {megabytes / elapsed:6.1f} MB/s"
          f"  peak RSS {peak_mb:6.1f} MB  (whole process: start-up, CRM and state writes included)")
    print(f"  raw FETCH+MOVE : {raw:6.2f} s  {count / raw:7.1f} mails/s  {megabytes / raw:6.1f} MB/s"
          "  (imapclient, no parsing, no writes)")
    if errors:
        print(f"  errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=10_000)
    parser.add_argument("--attachment-mb", type=int, default=50)
    args = parser.parse_args()
    server = Dovecot.start()
    try:
        print(f"Dovecot on 127.0.0.1:{server.port}; Python {sys.version.split()[0]}")
        scenario(server, "small", lambda: [small_mail(n) for n in range(args.mails)], args.mails)
        scenario(server, "big", lambda: [big_mail(args.attachment_mb), small_mail(1)], 2)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
