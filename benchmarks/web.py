"""`gwsync serve`: how fast its pages answer over a CRM of realistic size.

    python benchmarks/web.py [--activities 20000] [--contacts 2000] [--requests 200]

Seeds the embedded CRM in bulk (activities with an HTML body and a document each, contacts
spread over partners, a share of them unassigned), starts `gwsync serve` as a user would and
requests each kind of page over loopback, one after another, then 4 clients at once. Prints the
median and 95th percentile per page. No target in the issue; the figures are for the README.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from _setup import write_config
from gwsync.config import load_config
from gwsync.crm import ActivityDraft, Document
from gwsync.engine import Engine

HTML = ("<html><body><p>Dear Alice,</p><p>our <b>offer</b> no. {n} is attached.</p>"
        "<img src='https://tracker.example/p.gif?n={n}'><table><tr><td>Item</td><td>1.200 EUR</td></tr></table>"
        "<script>track()</script></body></html>")


def seed(config_path: Path, activities: int, contacts: int) -> None:
    with Engine(load_config(config_path)) as engine:
        crm = engine.crm
        partners = [crm.add_partner(f"Partner {p}", [f"info@p{p}.example"]).id for p in range(contacts // 10)]
        for c in range(contacts):
            crm.add_contact(f"Contact {c}", f"c{c}@p{c % len(partners)}.example", partners[c % len(partners)])
        sha, size = crm.put_document(iter([b"%PDF-1.4 benchmark\n" * 100]))
        batch = []
        for n in range(activities):
            contact = n % (contacts + contacts // 10)  # about one in eleven unassigned
            assigned = contact < contacts
            batch.append(ActivityDraft(
                key=f"bench:{n}", kind="MAILEIN", status="E", subject=f"Offer {n}", body=f"Dear Alice, offer {n}.",
                body_html=HTML.format(n=n), sender=f"c{contact}@p{contact % len(partners)}.example",
                contact_id=contact + 1 if assigned else None,
                partner_id=partners[contact % len(partners)] if assigned else None, unassigned=not assigned,
                source="alice:INBOX/CRM Offers [E]", start="2026-11-24T08:00:00+00:00",
                documents=[Document(filename=f"offer-{n}.pdf", content_type="application/pdf", size=size, sha256=sha)]))
            if len(batch) == 1000:
                crm.create_activities(batch)
                batch = []
        if batch:
            crm.create_activities(batch)


def timed(url: str, count: int) -> list[float]:
    session = requests.Session()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        response = session.get(url, timeout=30)
        response.raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
    return out


def report(name: str, times: list[float]) -> None:
    times = sorted(times)
    p95 = times[int(len(times) * 0.95) - 1]
    print(f"{name:<34} median {statistics.median(times):7.1f} ms   p95 {p95:7.1f} ms   ({len(times)} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activities", type=int, default=20000)
    parser.add_argument("--contacts", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gwsync-web-bench-") as tmp:
        config = write_config(Path(tmp))
        start = time.perf_counter()
        seed(config, args.activities, args.contacts)
        print(f"seeded {args.activities} activities, {args.contacts} contacts in {time.perf_counter() - start:.1f} s")
        server = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(config), "serve", "--port", "0"],
                                  stderr=subprocess.PIPE, text=True)
        try:
            base = re.search(r"(http://\S+?)/? ", server.stderr.readline()).group(1)
            pages = {
                "activity page (HTML mail, sanitised)": f"{base}/activities/{args.activities // 2}",
                "quick search, all imported, page 1": f"{base}/searches/imported",
                "quick search, page 200": f"{base}/searches/imported?page=200",
                "unassigned imported mail": f"{base}/searches/unassigned",
                "partner page": f"{base}/partners/3",
                "unknown senders (with the forms)": f"{base}/unknown",
                "start page (counts)": f"{base}/",
                "document download": f"{base}/activities/1/documents/1",
            }
            for name, url in pages.items():
                timed(url, 3)  # warm up
                report(name, timed(url, args.requests if "unknown" not in name else max(10, args.requests // 10)))
            results: list[float] = []
            url = pages["activity page (HTML mail, sanitised)"]
            threads = [threading.Thread(target=lambda: results.extend(timed(url, args.requests))) for _ in range(4)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            report("activity page, 4 clients at once", results)
            print(f"{'':<34} {len(results) / elapsed:.0f} pages/s in all")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
