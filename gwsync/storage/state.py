"""The sync state store (SQLite): what was done with each mail, per account, folder and UIDVALIDITY.

The CRM's idempotency keys are what prevents duplicates; this store makes re-runs cheap, keeps
held and failed mail with their reasons, bounds retries, and feeds `gwsync status`.
Losing it loses no mail and creates no duplicate.

Calendar links and memberships record the activity's identity (`Activity.identity`) next to its
id, so that an id given to another activity (a CRM restored from an older backup) is told from
the activity that was linked.

The schema is made and upgraded by MIGRATIONS (see gwsync/migrations.py), in the order it grew.
Version 1 (the identity columns) was recorded while the calendar and lock tables were still made
on first use, so a database at 0 or 1 may hold any part of the schema: the steps of version 2
check what is there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from .migrations import Migration, add_column, latest, upgrade
from .sqlite import open_private_db, transaction

IMPORTED, HELD, FAILED, QUARANTINED = "imported", "held", "failed", "quarantined"
# Left out in `gwsync review`: stays in its folder (or on its calendar), out of the CRM, until a
# review takes it in.
LEFT_OUT = "left-out"


@dataclass
class MailRecord:
    account: str
    folder: str
    uidvalidity: int
    uid: int
    outcome: str
    key: str | None = None
    activity_id: int | None = None
    attempts: int = 0
    error: str | None = None
    missing: list[str] | None = None
    sender: str | None = None
    subject: str | None = None
    updated_at: str | None = None


@dataclass
class CalendarLink:
    """An activity linked to a groupware item, with the fields both had at the last sync."""

    account: str
    area: str
    activity_id: int
    uid: str
    href: str
    etag: str | None
    base: dict | None
    identity: str | None = None  # the activity's identity when linked; None: saved before it was recorded
    organizer: str | None = None  # the item's ORGANIZER address at the last sync (its deletion may cancel)


@dataclass
class CalendarItemRecord:
    """A new calendar item kept out of the CRM: left out in a review, or held for a mandatory field."""

    account: str
    area: str
    href: str
    outcome: str  # LEFT_OUT or HELD
    uid: str | None = None
    subject: str | None = None
    missing: list[str] | None = None  # HELD: the mandatory fields it lacks
    addresses: list[str] | None = None  # HELD: its attendees' and organizer's addresses (to assign)
    updated_at: str | None = None


# ("save", CalendarLink) or ("drop", (account, area, activity_id[, href])): see apply_link_changes.
LinkChange = tuple[str, CalendarLink | tuple]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _first_release(db: sqlite_utils.Database) -> None:
    db.table("folders").create({"account": str, "folder": str, "uidvalidity": int, "last_sync": str},
                         pk=("account", "folder"), if_not_exists=True)
    db.table("messages").create(
        {"account": str, "folder": str, "uidvalidity": int, "uid": int, "outcome": str, "key": str,
         "activity_id": int, "attempts": int, "error": str, "missing": str, "sender": str,
         "subject": str, "updated_at": str},
        pk=("account", "folder", "uidvalidity", "uid"), if_not_exists=True)
    db.table("messages").create_index(["outcome"], if_not_exists=True)
    db.table("runs").create({"account": str, "area": str, "finished_at": str, "ok": int, "summary": str, "error": str},
                      pk=("account", "area"), if_not_exists=True)


def _calendar_tables(db: sqlite_utils.Database) -> None:
    db.table("links").create(
        {"account": str, "area": str, "activity_id": int, "uid": str, "href": str, "etag": str,
         "base": str, "updated_at": str}, pk=("account", "area", "activity_id"), if_not_exists=True)
    db.table("links").create_index(["account", "area", "href"], unique=True, if_not_exists=True)
    db.table("collections").create({"account": str, "area": str, "url": str, "sync_token": str},
                             pk=("account", "area"), if_not_exists=True)
    db.table("membership").create({"account": str, "area": str, "activity_id": int, "included": int},
                            pk=("account", "area", "activity_id"), if_not_exists=True)
    db.table("item_failures").create(
        {"account": str, "area": str, "href": str, "etag": str, "attempts": int, "error": str},
        pk=("account", "area", "href"), if_not_exists=True)


def _dav_cache(db: sqlite_utils.Database) -> None:
    """Made on first use with the other calendar tables: a database whose calendar tables are
    older than it never got it (and its calendar sync failed with "no such table")."""
    db.table("dav_cache").create({"account": str, "area": str, "source": str, "url": str, "auth_type": str},
                           pk=("account", "area"), if_not_exists=True)


def _locks(db: sqlite_utils.Database) -> None:
    db.table("locks").create({"account": str, "service": str, "reason": str, "locked_at": str},
                       pk=("account", "service"), if_not_exists=True)


def _last_success(db: sqlite_utils.Database) -> None:
    add_column(db, "runs", "last_success", str)


def _identities(db: sqlite_utils.Database) -> None:
    """Existing links and memberships keep an unknown identity (NULL); the calendar sync checks
    those against the item's UID."""
    for table in ("links", "membership"):
        add_column(db, table, "identity", str)


def _lock_credentials(db: sqlite_utils.Database) -> None:
    # Locks from before credentials had keys keep NULL and are found by account and service.
    db.table("locks").add_column("credential", str)


def _calendar_items(db: sqlite_utils.Database) -> None:
    db.table("calendar_items").create(
        {"account": str, "area": str, "href": str, "outcome": str, "uid": str, "subject": str, "missing": str,
         "addresses": str, "updated_at": str}, pk=("account", "area", "href"), if_not_exists=True)


def _link_organizers(db: sqlite_utils.Database) -> None:
    """Links learn the item's organizer (a deleted organizer's copy cancels the meeting) and are
    found by UID across accounts (one activity per UID)."""
    add_column(db, "links", "organizer", str)
    db.table("links").create_index(["area", "uid"], if_not_exists=True)


MIGRATIONS = [
    Migration(2, "folders, messages, runs: the first release", _first_release),
    Migration(2, "links, collections, membership, item_failures (calendar sync)", _calendar_tables),
    Migration(2, "dav_cache (calendar discovery)", _dav_cache),
    Migration(2, "locks (credential locks)", _locks),
    Migration(2, "runs: last_success", _last_success),
    Migration(2, "links and membership: the activity's identity (recorded as version 1)", _identities),
    Migration(3, "locks: the credential each lock is for", _lock_credentials),
    Migration(4, "calendar_items: new items left out in a review or held for a mandatory field", _calendar_items),
    Migration(5, "links: the item's organizer; links by UID", _link_organizers),
]
SCHEMA_VERSION = latest(MIGRATIONS)


class StateStore:
    def __init__(self, path: Path):
        self.conn = open_private_db(path, "state database")
        self.db = sqlite_utils.Database(self.conn)
        try:
            upgrade(self.db, MIGRATIONS)
        except BaseException:
            self.conn.close()
            raise

    # -- credential locks --------------------------------------------------------------------

    def lock(self, account: str, service: str, reason: str, credential: str | None = None) -> None:
        """Mark a credential locked after a refused login: no further login until unlocked.
        `credential` names what was sent (see Engine.credential); every service that sends the
        same one finds the lock."""
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO locks (account, service, reason, locked_at, credential) "
                              "VALUES (?,?,?,?,?)", (account, service, reason, _now(), credential))

    def lock_of(self, credential: str, users: Iterable[tuple[str, str]] = ()) -> dict | None:
        """The lock on this credential, if any. `users` are the (account, service) pairs that
        send it: they find the locks written before locks had a credential."""
        rows = list(self.db.query("SELECT * FROM locks WHERE credential = ? ORDER BY locked_at", [credential]))
        for account, service in users:
            rows += self.db.query("SELECT * FROM locks WHERE credential IS NULL AND account = ? AND service = ?",
                                  [account, service])
        return rows[0] if rows else None

    def locks(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM locks ORDER BY account, service"))

    def unlock(self, account: str) -> list[str]:
        """Clear the account's locks; returns the services that were locked."""
        with transaction(self.conn):
            services = [r[0] for r in self.conn.execute("SELECT service FROM locks WHERE account = ? "
                                                        "ORDER BY service", (account,))]
            self.conn.execute("DELETE FROM locks WHERE account = ?", (account,))
        return services

    # -- calendar links ----------------------------------------------------------------------

    @staticmethod
    def _link(row: dict) -> CalendarLink:
        return CalendarLink(account=row["account"], area=row["area"], activity_id=row["activity_id"], uid=row["uid"],
                            href=row["href"], etag=row["etag"], base=json.loads(row["base"]) if row["base"] else None,
                            identity=row.get("identity"), organizer=row.get("organizer"))

    def links(self, account: str, area: str) -> list[CalendarLink]:
        return [self._link(r) for r in self.db.query("SELECT * FROM links WHERE account = ? AND area = ?",
                                                     [account, area])]

    def links_by_uid(self, area: str, uids: Iterable[str]) -> list[CalendarLink]:
        """Every account's links in the area to items with these UIDs (the copies of one meeting)."""
        uids = list(dict.fromkeys(uids))
        found: list[CalendarLink] = []
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found += map(self._link, self.db.query(f"SELECT * FROM links WHERE area = ? AND uid IN ({marks})",
                                                   [area, *chunk]))
        return found

    def links_of_activity(self, activity_id: int, identity: str | None = None) -> list[CalendarLink]:
        """The activity's links; with its identity, not those saved for another activity that
        held the id before (links saved before identities were recorded are included)."""
        return [link for link in map(self._link, self.db.query("SELECT * FROM links WHERE activity_id = ?",
                                                               [activity_id]))
                if identity is None or link.identity in (None, identity)]

    def apply_link_changes(self, changes: list[LinkChange]) -> None:
        """Several ("save", CalendarLink) / ("drop", (account, area, activity_id[, href])) in one
        transaction. A drop with the href removes that link only, never a newer link that an
        activity now holding the same id got meanwhile."""
        if not changes:
            return
        with transaction(self.conn):
            for _op, value in changes:
                if isinstance(value, CalendarLink):  # ("save", link)
                    link = value
                    self.conn.execute(
                        "DELETE FROM links WHERE account = ? AND area = ? AND href = ? AND activity_id != ?",
                        (link.account, link.area, link.href, link.activity_id))
                    self.conn.execute(
                        "INSERT OR REPLACE INTO links (account, area, activity_id, uid, href, etag, base, updated_at, "
                        "identity, organizer) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (link.account, link.area, link.activity_id, link.uid, link.href, link.etag,
                         json.dumps(link.base, sort_keys=True) if link.base is not None else None, _now(),
                         link.identity, link.organizer))
                elif len(value) == 4:
                    self.conn.execute("DELETE FROM links WHERE account = ? AND area = ? AND activity_id = ? "
                                      "AND href = ?", value)
                else:
                    self.conn.execute("DELETE FROM links WHERE account = ? AND area = ? AND activity_id = ?", value)

    def drop_link(self, account: str, area: str, activity_id: int, href: str | None = None) -> None:
        self.apply_link_changes([("drop", (account, area, activity_id) + ((href,) if href is not None else ()))])

    def dav_cache(self, account: str, area: str, source: str) -> tuple[str | None, str | None]:
        """(collection URL, auth scheme) found by an earlier run for the same config `source`."""
        row = self.conn.execute("SELECT source, url, auth_type FROM dav_cache WHERE account = ? AND area = ?",
                                (account, area)).fetchone()
        return (row[1], row[2]) if row and row[0] == source else (None, None)

    def save_dav_cache(self, account: str, area: str, source: str, url: str | None, auth_type: str | None) -> None:
        with transaction(self.conn):
            if url is None:
                self.conn.execute("DELETE FROM dav_cache WHERE account = ? AND area = ?", (account, area))
            else:
                self.conn.execute("INSERT OR REPLACE INTO dav_cache VALUES (?,?,?,?,?)",
                                  (account, area, source, url, auth_type))

    def memberships(self, account: str, area: str) -> dict[int, bool]:
        """Activities pushed into (True) or taken out of (False) an area by hand."""
        return {activity_id: included for activity_id, (included, _) in self.membership_details(account, area).items()}

    def membership_details(self, account: str, area: str) -> dict[int, tuple[bool, str | None]]:
        """activity id -> (included, the identity of the activity it was set for, if recorded)."""
        return {r[0]: (bool(r[1]), r[2]) for r in self.conn.execute(
            "SELECT activity_id, included, identity FROM membership WHERE account = ? AND area = ?", (account, area))}

    def set_membership(self, account: str, area: str, activity_id: int, included: bool,
                       identity: str | None = None) -> None:
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO membership (account, area, activity_id, included, identity) "
                              "VALUES (?,?,?,?,?)", (account, area, activity_id, int(included), identity))

    def sync_token(self, account: str, area: str, url: str) -> str | None:
        row = self.conn.execute("SELECT url, sync_token FROM collections WHERE account = ? AND area = ?",
                                (account, area)).fetchone()
        return row[1] if row and row[0] == url else None

    def save_sync_token(self, account: str, area: str, url: str, token: str | None) -> None:
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO collections (account, area, url, sync_token) VALUES (?,?,?,?)",
                              (account, area, url, token))

    def item_failures(self, account: str, area: str) -> dict[str, dict]:
        return {r["href"]: r for r in self.db.query(
            "SELECT * FROM item_failures WHERE account = ? AND area = ?", [account, area])}

    def record_item_failure(self, account: str, area: str, href: str, etag: str | None, error: str) -> int:
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT attempts, etag FROM item_failures WHERE account = ? AND area = ? AND href = ?",
                (account, area, href)).fetchone()
            attempts = (row[0] if row and row[1] == etag else 0) + 1  # a new version gets new attempts
            self.conn.execute("INSERT OR REPLACE INTO item_failures VALUES (?,?,?,?,?,?)",
                              (account, area, href, etag, attempts, error))
        return attempts

    def clear_item_failure(self, account: str, area: str, href: str) -> None:
        with transaction(self.conn):
            self.conn.execute("DELETE FROM item_failures WHERE account = ? AND area = ? AND href = ?",
                              (account, area, href))

    # -- calendar items kept out of the CRM -------------------------------------------------------

    def calendar_items(self, account: str | None = None, area: str | None = None,
                       outcome: str | None = None) -> list[CalendarItemRecord]:
        sql, params = "SELECT * FROM calendar_items WHERE 1", []
        for column, value in (("account", account), ("area", area), ("outcome", outcome)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        return [CalendarItemRecord(
            account=r["account"], area=r["area"], href=r["href"], outcome=r["outcome"], uid=r["uid"],
            subject=r["subject"], missing=json.loads(r["missing"]) if r["missing"] else None,
            addresses=json.loads(r["addresses"]) if r["addresses"] else None, updated_at=r["updated_at"])
            for r in self.db.query(sql + " ORDER BY account, area, href", params)]

    def save_calendar_items(self, records: Iterable[CalendarItemRecord], forget: Iterable[tuple[str, str, str]] = (),
                            outcome: str | None = None) -> None:
        """Forget these (account, area, href) records (only those with `outcome`, if given), then
        save `records`, in one transaction."""
        now = _now()
        with transaction(self.conn):
            for account, area, href in forget:
                self.conn.execute("DELETE FROM calendar_items WHERE account = ? AND area = ? AND href = ?"
                                  + (" AND outcome = ?" if outcome else ""),
                                  (account, area, href, *((outcome,) if outcome else ())))
            self.conn.executemany(
                "INSERT OR REPLACE INTO calendar_items (account, area, href, outcome, uid, subject, missing, "
                "addresses, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [(r.account, r.area, r.href, r.outcome, r.uid, r.subject,
                  json.dumps(r.missing) if r.missing is not None else None,
                  json.dumps(r.addresses) if r.addresses is not None else None, now) for r in records])

    def take_in(self, account: str, area: str, hrefs: Iterable[str]) -> None:
        """Items a review takes in: their records go, and the collection is listed whole at the
        next sync (an unchanged item would not come up in a delta)."""
        hrefs = list(hrefs)
        if not hrefs:
            return
        with transaction(self.conn):
            self.conn.executemany("DELETE FROM calendar_items WHERE account = ? AND area = ? AND href = ?",
                                  [(account, area, href) for href in hrefs])
            self.conn.execute("UPDATE collections SET sync_token = NULL WHERE account = ? AND area = ?",
                              (account, area))

    # -- folders -----------------------------------------------------------------------------

    def check_uidvalidity(self, account: str, folder: str, uidvalidity: int) -> bool:
        """Record the folder's UIDVALIDITY; True when it changed (old per-UID records are dropped:
        the UIDs now name other mails, and the CRM's keys still prevent duplicates)."""
        row = self.conn.execute("SELECT uidvalidity FROM folders WHERE account = ? AND folder = ?",
                                (account, folder)).fetchone()
        if row and row[0] == uidvalidity:
            return False
        with transaction(self.conn):
            self.conn.execute("DELETE FROM messages WHERE account = ? AND folder = ? AND uidvalidity != ?",
                              (account, folder, uidvalidity))
            self.conn.execute(
                "INSERT INTO folders (account, folder, uidvalidity, last_sync) VALUES (?,?,?,?) "
                "ON CONFLICT(account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity",
                (account, folder, uidvalidity, None))
        return row is not None

    # -- messages ----------------------------------------------------------------------------

    def records(self, account: str, folder: str, uidvalidity: int) -> dict[int, MailRecord]:
        rows = self.db.query(
            "SELECT * FROM messages WHERE account = ? AND folder = ? AND uidvalidity = ?",
            [account, folder, uidvalidity])
        return {row["uid"]: self._record(row) for row in rows}

    def save(self, records: Iterable[MailRecord]) -> None:
        now = _now()
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT OR REPLACE INTO messages (account, folder, uidvalidity, uid, outcome, key, activity_id, "
                "attempts, error, missing, sender, subject, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r.account, r.folder, r.uidvalidity, r.uid, r.outcome, r.key, r.activity_id, r.attempts,
                  r.error, json.dumps(r.missing) if r.missing is not None else None, r.sender, r.subject, now)
                 for r in records])

    def forget(self, account: str, folder: str, uidvalidity: int, uids: Iterable[int]) -> None:
        """Drop records of mails that left the folder (moved to the archive, or gone)."""
        uids = list(uids)
        if not uids:
            return
        with transaction(self.conn):
            self.conn.executemany(
                "DELETE FROM messages WHERE account = ? AND folder = ? AND uidvalidity = ? AND uid = ?",
                [(account, folder, uidvalidity, uid) for uid in uids])

    def forget_folders_except(self, account: str, folders: Iterable[str]) -> None:
        """Drop records of import folders that no longer exist."""
        keep = list(folders)
        marks = ",".join("?" * len(keep)) or "''"
        with transaction(self.conn):
            self.conn.execute(f"DELETE FROM messages WHERE account = ? AND folder NOT IN ({marks})", [account, *keep])
            self.conn.execute(f"DELETE FROM folders WHERE account = ? AND folder NOT IN ({marks})", [account, *keep])

    def by_outcome(self, outcome: str, account: str | None = None) -> list[MailRecord]:
        sql = "SELECT * FROM messages WHERE outcome = ?"
        params: list = [outcome]
        if account:
            sql += " AND account = ?"
            params.append(account)
        return [self._record(row) for row in self.db.query(sql + " ORDER BY account, folder, uid", params)]

    def not_imported(self) -> list[MailRecord]:
        """Mail still in its folder: held back, failing, quarantined, or left out in a review (in that order)."""
        return [r for outcome in (HELD, FAILED, QUARANTINED, LEFT_OUT) for r in self.by_outcome(outcome)]

    @staticmethod
    def _record(row: dict) -> MailRecord:
        return MailRecord(
            account=row["account"], folder=row["folder"], uidvalidity=row["uidvalidity"], uid=row["uid"],
            outcome=row["outcome"], key=row["key"], activity_id=row["activity_id"], attempts=row["attempts"] or 0,
            error=row["error"], missing=json.loads(row["missing"]) if row["missing"] else None,
            sender=row["sender"], subject=row["subject"], updated_at=row["updated_at"])

    # -- runs --------------------------------------------------------------------------------

    def record_run(self, account: str, area: str, ok: bool, summary: dict, error: str | None) -> None:
        """The latest run of an area; `last_success` survives failed runs after it."""
        now = _now()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO runs (account, area, finished_at, ok, summary, error, last_success) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(account, area) DO UPDATE SET finished_at = excluded.finished_at, "
                "ok = excluded.ok, summary = excluded.summary, error = excluded.error, "
                "last_success = COALESCE(excluded.last_success, runs.last_success)",
                (account, area, now, int(ok), json.dumps(summary), error, now if ok else None))

    def runs(self) -> list[dict]:
        return [dict(row, summary=json.loads(row["summary"] or "{}"))
                for row in self.db.query("SELECT * FROM runs ORDER BY account, area")]

    def close(self) -> None:
        self.conn.close()
