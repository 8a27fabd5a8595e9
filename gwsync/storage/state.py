"""The sync state store: what was done with each mail, per account, folder and UIDVALIDITY.

An SQLite file, or tables in the shared PostgreSQL database ([database] url): one code path on
SQLAlchemy Core (see gwsync/storage/database.py), like the CRM store.

The CRM's idempotency keys are what prevents duplicates; this store makes re-runs cheap, keeps
held and failed mail with their reasons, bounds retries, and feeds `gwsync status`.
Losing it loses no mail and creates no duplicate.

Calendar links and memberships record the activity's identity (`Activity.identity`) next to its
id, so that an id given to another activity (a CRM restored from an older backup) is told from
the activity that was linked.

The schema is made and upgraded by MIGRATIONS (see gwsync/migrations.py), in the order it grew.
Version 1 (the identity columns) was recorded while the calendar and lock tables were still made
on first use, so a database at 0 or 1 may hold any part of the schema: the steps of version 2
check what is there. On PostgreSQL a new database gets the tables at POSTGRES_FIRST from the
definitions below; a later step brings its own PostgreSQL statements (Migration.postgres).
"""

from __future__ import annotations

import functools
import json
import operator
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlite_utils
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .database import Readers, pg_upgrade, postgres_engine, shown, sqlite_engine, write
from .migrations import Migration, add_column, latest, postgres_steps, upgrade
from .records import (
    FAILED,
    HELD,
    IMPORTED,  # noqa: F401 - for the importers of this module
    LEFT_OUT,
    QUARANTINED,
    AccountRecord,
    CalendarItemRecord,
    CalendarLink,
    LinkChange,
    MailRecord,
)


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


def _accounts(db: sqlite_utils.Database) -> None:
    db.table("accounts").create({"name": str, "username": str, "email": str, "areas": str, "added_at": str},
                                pk="name", if_not_exists=True)


def _accounts_postgres(conn: sa.Connection) -> None:
    accounts_table.create(conn, checkfirst=True)


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
    Migration(6, "accounts: the accounts kept in the database (gwsync accounts)", _accounts,
              postgres=_accounts_postgres),
]
SCHEMA_VERSION = latest(MIGRATIONS)



# -- the tables, as SQLAlchemy sees them (see gwsync/crm/embedded.py for how they are used) -----------

metadata = sa.MetaData()
_INT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # UIDs and UIDVALIDITY reach 2**32 - 1


def _key(*names: str) -> list[sa.Column]:
    return [sa.Column(name, _INT if name in ("uidvalidity", "uid", "activity_id") else sa.Text, primary_key=True)
            for name in names]


def _columns(**kinds) -> list[sa.Column]:
    return [sa.Column(name, _INT if kind is int else sa.Text) for name, kind in kinds.items()]


folders_table = sa.Table("folders", metadata, *_key("account", "folder"), *_columns(uidvalidity=int, last_sync=str))
messages = sa.Table(
    "messages", metadata, *_key("account", "folder", "uidvalidity", "uid"),
    *_columns(outcome=str, key=str, activity_id=int, attempts=int, error=str, missing=str, sender=str, subject=str,
              updated_at=str),
    sa.Index("idx_messages_outcome", "outcome"))
runs = sa.Table("runs", metadata, *_key("account", "area"),
                *_columns(finished_at=str, ok=int, summary=str, error=str, last_success=str))
links = sa.Table("links", metadata, *_key("account", "area", "activity_id"),
                 *_columns(uid=str, href=str, etag=str, base=str, updated_at=str, identity=str, organizer=str),
                 sa.Index("idx_links_account_area_href", "account", "area", "href", unique=True),
                 sa.Index("idx_links_area_uid", "area", "uid"))
collections = sa.Table("collections", metadata, *_key("account", "area"), *_columns(url=str, sync_token=str))
membership = sa.Table("membership", metadata, *_key("account", "area", "activity_id"),
                      *_columns(included=int, identity=str))
item_failures = sa.Table("item_failures", metadata, *_key("account", "area", "href"),
                         *_columns(etag=str, attempts=int, error=str))
dav_cache = sa.Table("dav_cache", metadata, *_key("account", "area"), *_columns(source=str, url=str, auth_type=str))
locks = sa.Table("locks", metadata, *_key("account", "service"),
                 *_columns(reason=str, locked_at=str, credential=str))
accounts_table = sa.Table("accounts", metadata, *_key("name"),
                          *_columns(username=str, email=str, areas=str, added_at=str))
calendar_items = sa.Table("calendar_items", metadata, *_key("account", "area", "href"),
                          *_columns(outcome=str, uid=str, subject=str, missing=str, addresses=str, updated_at=str))

# The version the first PostgreSQL databases were made at: the steps up to it are SQLite's history.
POSTGRES_FIRST = 5



def _json(value) -> str | None:
    return json.dumps(value) if value is not None else None


class StateStore:
    """The state on an SQLite file (`database` a Path) or on PostgreSQL (a postgresql:// URL,
    `password` a callable giving its password or None)."""

    def __init__(self, database: Path | str, password: Callable[[], str | None] | None = None):
        self._postgres = isinstance(database, str)
        if isinstance(database, str):
            self.engine = postgres_engine(database, "state database", password)
        else:
            self.engine = sqlite_engine(database, "state database")
        self._read = Readers(self.engine)
        try:
            if isinstance(database, str):
                pg_upgrade(self.engine, "state", SCHEMA_VERSION, "state database", shown(database),
                           metadata.create_all, postgres_steps(MIGRATIONS, POSTGRES_FIRST))
            else:
                with self.engine.connect() as conn:  # the migrations are written against sqlite-utils
                    raw = conn.connection.dbapi_connection
                    assert isinstance(raw, sqlite3.Connection)  # sqlite_engine's, from open_private_db
                    upgrade(sqlite_utils.Database(raw), MIGRATIONS)
        except BaseException:
            self.engine.dispose()
            raise

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        if self._postgres:
            from sqlalchemy.dialects import postgresql  # loaded for a PostgreSQL store only
            return postgresql.insert(table)
        return sqlite_insert(table)

    def _upsert(self, table: sa.Table, update: Iterable[str] | None = None, kept: Iterable[str] = ()):
        """INSERT ... ON CONFLICT (primary key) DO UPDATE: the row replaced (the columns in
        `update`, all but the key by default), as INSERT OR REPLACE did when every column is
        given; a column in `kept` keeps its value where the new one is NULL."""
        statement = self._insert(table)
        key = [c.name for c in table.primary_key.columns]
        names = [c.name for c in table.columns if c.name not in key] if update is None else list(update)
        changes: dict[str, Any] = {name: statement.excluded[name] for name in names}
        changes.update({name: sa.func.coalesce(statement.excluded[name], table.c[name]) for name in kept})
        return statement.on_conflict_do_update(index_elements=key, set_=changes)

    def _dicts(self, statement) -> list[dict]:
        with self._read() as conn:
            return [dict(row) for row in conn.execute(statement).mappings()]

    def _first(self, statement):
        with self._read() as conn:
            return conn.execute(statement).first()

    # -- credential locks --------------------------------------------------------------------

    def lock(self, account: str, service: str, reason: str, credential: str | None = None) -> None:
        """Mark a credential locked after a refused login: no further login until unlocked.
        `credential` names what was sent (see Engine.credential); every service that sends the
        same one finds the lock."""
        with write(self.engine) as conn:
            conn.execute(self._upsert(locks), {"account": account, "service": service, "reason": reason,
                                               "locked_at": _now(), "credential": credential})

    def lock_of(self, credential: str, users: Iterable[tuple[str, str]] = ()) -> dict | None:
        """The lock on this credential, if any. `users` are the (account, service) pairs that
        send it: they find the locks written before locks had a credential."""
        rows = self._dicts(sa.select(locks).where(locks.c.credential == credential).order_by(locks.c.locked_at))
        for account, service in users:
            rows += self._dicts(sa.select(locks).where(locks.c.credential.is_(None), locks.c.account == account,
                                                       locks.c.service == service))
        return rows[0] if rows else None

    def locks(self) -> list[dict]:
        return self._dicts(sa.select(locks).order_by(locks.c.account, locks.c.service))

    def unlock(self, account: str) -> list[str]:
        """Clear the account's locks; returns the services that were locked."""
        with write(self.engine) as conn:
            services = list(conn.execute(sa.select(locks.c.service).where(locks.c.account == account)
                                         .order_by(locks.c.service)).scalars())
            conn.execute(sa.delete(locks).where(locks.c.account == account))
        return services

    # -- calendar links ----------------------------------------------------------------------

    @staticmethod
    def _link(row) -> CalendarLink:
        return CalendarLink(account=row["account"], area=row["area"], activity_id=row["activity_id"], uid=row["uid"],
                            href=row["href"], etag=row["etag"], base=json.loads(row["base"]) if row["base"] else None,
                            identity=row["identity"], organizer=row["organizer"])

    def links(self, account: str, area: str) -> list[CalendarLink]:
        return [self._link(r) for r in self._dicts(sa.select(links).where(links.c.account == account,
                                                                          links.c.area == area))]

    def links_by_uid(self, area: str, uids: Iterable[str]) -> list[CalendarLink]:
        """Every account's links in the area to items with these UIDs (the copies of one meeting)."""
        uids = list(dict.fromkeys(uids))
        found: list[CalendarLink] = []
        for start in range(0, len(uids), 500):
            found += map(self._link, self._dicts(sa.select(links).where(
                links.c.area == area, links.c.uid.in_(uids[start:start + 500]))))
        return found

    def links_of_activity(self, activity_id: int, identity: str | None = None) -> list[CalendarLink]:
        """The activity's links; with its identity, not those saved for another activity that
        held the id before (links saved before identities were recorded are included)."""
        found = self._dicts(sa.select(links).where(links.c.activity_id == activity_id))
        return [link for link in map(self._link, found)
                if identity is None or link.identity in (None, identity)]

    def apply_link_changes(self, changes: list[LinkChange]) -> None:
        """Several ("save", CalendarLink) / ("drop", (account, area, activity_id[, href])) in one
        transaction. A drop with the href removes that link only, never a newer link that an
        activity now holding the same id got meanwhile."""
        if not changes:
            return
        c = links.c
        with write(self.engine) as conn:
            for _op, value in changes:
                if isinstance(value, CalendarLink):  # ("save", link)
                    link = value
                    conn.execute(sa.delete(links).where(c.account == link.account, c.area == link.area,
                                                        c.href == link.href, c.activity_id != link.activity_id))
                    conn.execute(self._upsert(links), {
                        "account": link.account, "area": link.area, "activity_id": link.activity_id, "uid": link.uid,
                        "href": link.href, "etag": link.etag,
                        "base": json.dumps(link.base, sort_keys=True) if link.base is not None else None,
                        "updated_at": _now(), "identity": link.identity, "organizer": link.organizer})
                else:
                    account, area, activity_id, *href = value
                    conn.execute(sa.delete(links).where(c.account == account, c.area == area,
                                                        c.activity_id == activity_id,
                                                        *([c.href == href[0]] if href else [])))

    def drop_link(self, account: str, area: str, activity_id: int, href: str | None = None) -> None:
        self.apply_link_changes([("drop", (account, area, activity_id) + ((href,) if href is not None else ()))])

    def dav_cache(self, account: str, area: str, source: str) -> tuple[str | None, str | None]:
        """(collection URL, auth scheme) found by an earlier run for the same config `source`."""
        row = self._first(sa.select(dav_cache.c.source, dav_cache.c.url, dav_cache.c.auth_type)
                          .where(dav_cache.c.account == account, dav_cache.c.area == area))
        return (row[1], row[2]) if row and row[0] == source else (None, None)

    def save_dav_cache(self, account: str, area: str, source: str, url: str | None, auth_type: str | None) -> None:
        with write(self.engine) as conn:
            if url is None:
                conn.execute(sa.delete(dav_cache).where(dav_cache.c.account == account, dav_cache.c.area == area))
            else:
                conn.execute(self._upsert(dav_cache), {"account": account, "area": area, "source": source,
                                                       "url": url, "auth_type": auth_type})

    def memberships(self, account: str, area: str) -> dict[int, bool]:
        """Activities pushed into (True) or taken out of (False) an area by hand."""
        return {activity_id: included for activity_id, (included, _) in self.membership_details(account, area).items()}

    def membership_details(self, account: str, area: str) -> dict[int, tuple[bool, str | None]]:
        """activity id -> (included, the identity of the activity it was set for, if recorded)."""
        m = membership.c
        with self._read() as conn:
            return {r[0]: (bool(r[1]), r[2]) for r in conn.execute(
                sa.select(m.activity_id, m.included, m.identity).where(m.account == account, m.area == area))}

    def set_membership(self, account: str, area: str, activity_id: int, included: bool,
                       identity: str | None = None) -> None:
        with write(self.engine) as conn:
            conn.execute(self._upsert(membership), {"account": account, "area": area, "activity_id": activity_id,
                                                    "included": int(included), "identity": identity})

    def sync_token(self, account: str, area: str, url: str) -> str | None:
        row = self._first(sa.select(collections.c.url, collections.c.sync_token)
                          .where(collections.c.account == account, collections.c.area == area))
        return row[1] if row and row[0] == url else None

    def save_sync_token(self, account: str, area: str, url: str, token: str | None) -> None:
        with write(self.engine) as conn:
            conn.execute(self._upsert(collections), {"account": account, "area": area, "url": url,
                                                     "sync_token": token})

    def item_failures(self, account: str, area: str) -> dict[str, dict]:
        return {r["href"]: r for r in self._dicts(sa.select(item_failures).where(
            item_failures.c.account == account, item_failures.c.area == area))}

    def record_item_failure(self, account: str, area: str, href: str, etag: str | None, error: str) -> int:
        f = item_failures.c
        with write(self.engine) as conn:
            row = conn.execute(sa.select(f.attempts, f.etag).where(f.account == account, f.area == area,
                                                                   f.href == href).with_for_update()).first()
            attempts = (row[0] if row and row[1] == etag else 0) + 1  # a new version gets new attempts
            conn.execute(self._upsert(item_failures), {"account": account, "area": area, "href": href, "etag": etag,
                                                       "attempts": attempts, "error": error})
        return attempts

    def clear_item_failure(self, account: str, area: str, href: str) -> None:
        f = item_failures.c
        with write(self.engine) as conn:
            conn.execute(sa.delete(item_failures).where(f.account == account, f.area == area, f.href == href))

    # -- calendar items kept out of the CRM -------------------------------------------------------

    def calendar_items(self, account: str | None = None, area: str | None = None,
                       outcome: str | None = None) -> list[CalendarItemRecord]:
        c = calendar_items.c
        where = [column == value for column, value in ((c.account, account), (c.area, area), (c.outcome, outcome))
                 if value is not None]
        return [CalendarItemRecord(
            account=r["account"], area=r["area"], href=r["href"], outcome=r["outcome"], uid=r["uid"],
            subject=r["subject"], missing=json.loads(r["missing"]) if r["missing"] else None,
            addresses=json.loads(r["addresses"]) if r["addresses"] else None, updated_at=r["updated_at"])
            for r in self._dicts(sa.select(calendar_items).where(*where).order_by(c.account, c.area, c.href))]

    def save_calendar_items(self, records: Iterable[CalendarItemRecord], forget: Iterable[tuple[str, str, str]] = (),
                            outcome: str | None = None) -> None:
        """Forget these (account, area, href) records (only those with `outcome`, if given), then
        save `records`, in one transaction."""
        now = _now()
        c = calendar_items.c
        rows = [{"account": r.account, "area": r.area, "href": r.href, "outcome": r.outcome, "uid": r.uid,
                 "subject": r.subject, "missing": _json(r.missing), "addresses": _json(r.addresses),
                 "updated_at": now} for r in records]
        with write(self.engine) as conn:
            for account, area, href in forget:
                conn.execute(sa.delete(calendar_items).where(c.account == account, c.area == area, c.href == href,
                                                             *([c.outcome == outcome] if outcome else [])))
            if rows:
                conn.execute(self._upsert(calendar_items), rows)

    def take_in(self, account: str, area: str, hrefs: Iterable[str]) -> None:
        """Items a review takes in: their records go, and the collection is listed whole at the
        next sync (an unchanged item would not come up in a delta)."""
        hrefs = list(hrefs)
        if not hrefs:
            return
        c = calendar_items.c
        with write(self.engine) as conn:
            conn.execute(sa.delete(calendar_items).where(c.account == account, c.area == area, c.href.in_(hrefs)))
            conn.execute(sa.update(collections).where(collections.c.account == account, collections.c.area == area)
                         .values(sync_token=None))

    # -- folders -----------------------------------------------------------------------------

    def check_uidvalidity(self, account: str, folder: str, uidvalidity: int) -> bool:
        """Record the folder's UIDVALIDITY; True when it changed (old per-UID records are dropped:
        the UIDs now name other mails, and the CRM's keys still prevent duplicates)."""
        f = folders_table.c
        row = self._first(sa.select(f.uidvalidity).where(f.account == account, f.folder == folder))
        if row and row[0] == uidvalidity:
            return False
        m = messages.c
        with write(self.engine) as conn:
            conn.execute(sa.delete(messages).where(m.account == account, m.folder == folder,
                                                   m.uidvalidity != uidvalidity))
            conn.execute(self._upsert(folders_table, update=["uidvalidity"]),
                         {"account": account, "folder": folder, "uidvalidity": uidvalidity, "last_sync": None})
        return row is not None

    # -- messages ----------------------------------------------------------------------------

    def records(self, account: str, folder: str, uidvalidity: int) -> dict[int, MailRecord]:
        m = messages.c
        rows = self._dicts(sa.select(messages).where(m.account == account, m.folder == folder,
                                                      m.uidvalidity == uidvalidity))
        return {row["uid"]: self._record(row) for row in rows}

    def save(self, records: Iterable[MailRecord]) -> None:
        now = _now()
        rows = [{"account": r.account, "folder": r.folder, "uidvalidity": r.uidvalidity, "uid": r.uid,
                 "outcome": r.outcome, "key": r.key, "activity_id": r.activity_id, "attempts": r.attempts,
                 "error": r.error, "missing": _json(r.missing), "sender": r.sender, "subject": r.subject,
                 "updated_at": now} for r in records]
        if not rows:
            return
        sql, values = self._save_sql
        with write(self.engine) as conn:
            conn.exec_driver_sql(sql, list(map(values, rows)) if values is not None else rows)

    @functools.cached_property
    def _save_sql(self) -> tuple[str, Callable[[dict], tuple] | None]:
        """The upsert of `save`, compiled once for this database, run through the driver's
        executemany with plain values (as the CRM's inserts): SQLAlchemy's statement building
        and per-row parameter handling cost more than SQLite's own upsert of a batch."""
        compiled = self._upsert(messages).compile(dialect=self.engine.dialect,
                                                  column_keys=[c.name for c in messages.columns])
        order = compiled.positiontup if compiled.positional else None
        return str(compiled), operator.itemgetter(*order) if order else None

    def forget(self, account: str, folder: str, uidvalidity: int, uids: Iterable[int]) -> None:
        """Drop records of mails that left the folder (moved to the archive, or gone)."""
        uids = list(uids)
        if not uids:
            return
        m = messages.c
        with write(self.engine) as conn:
            for start in range(0, len(uids), 500):
                conn.execute(sa.delete(messages).where(m.account == account, m.folder == folder,
                                                       m.uidvalidity == uidvalidity,
                                                       m.uid.in_(uids[start:start + 500])))

    def forget_folders_except(self, account: str, folders: Iterable[str]) -> None:
        """Drop records of import folders that no longer exist."""
        keep = list(folders)
        with write(self.engine) as conn:
            for table in (messages, folders_table):
                conn.execute(sa.delete(table).where(table.c.account == account, table.c.folder.not_in(keep)))

    def by_outcome(self, outcome: str, account: str | None = None) -> list[MailRecord]:
        m = messages.c
        where = [m.outcome == outcome, *([m.account == account] if account else [])]
        return [self._record(row) for row in self._dicts(sa.select(messages).where(*where)
                                                         .order_by(m.account, m.folder, m.uid))]

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

    # -- accounts kept in the database ----------------------------------------------------------

    @staticmethod
    def _account(row) -> AccountRecord:
        return AccountRecord(name=row["name"], username=row["username"], email=row["email"],
                             areas=tuple(filter(None, (row["areas"] or "").split(","))), added_at=row["added_at"])

    def accounts(self) -> list[AccountRecord]:
        return [self._account(r) for r in self._dicts(sa.select(accounts_table).order_by(accounts_table.c.name))]

    def add_account(self, record: AccountRecord) -> AccountRecord | None:
        """Add the account unless one of its name is there: None when added, else the stored one
        (two adds at once: the database lets one in, the other gets the stored record)."""
        insert = (self._insert(accounts_table).on_conflict_do_nothing(index_elements=["name"])
                  .returning(accounts_table.c.name))  # rowcount is not told for it on PostgreSQL
        with write(self.engine) as conn:
            if conn.execute(insert, self._account_row(record)).first() is not None:
                return None
            row = conn.execute(sa.select(accounts_table).where(accounts_table.c.name == record.name)).mappings().first()
        return self._account(row)

    def save_accounts(self, records: list[AccountRecord]) -> tuple[list[str], list[str]]:
        """Add or update these accounts in one transaction (an import: all or nothing); an
        account stored with the same username, email and areas is left as it is. Returns the
        names (added, changed)."""
        c = accounts_table.c
        added: list[str] = []
        changed: list[str] = []
        with write(self.engine) as conn:
            stored: dict[str, AccountRecord] = {}
            names = [r.name for r in records]
            for start in range(0, len(names), 500):
                query = sa.select(accounts_table).where(c.name.in_(names[start:start + 500]))
                if self._postgres:
                    query = query.with_for_update()
                stored.update((row["name"], self._account(row)) for row in conn.execute(query).mappings())
            rows = []
            for record in records:
                old = stored.get(record.name)
                if old is not None and old.same(record):
                    continue
                (changed if old is not None else added).append(record.name)
                rows.append(self._account_row(record, old.added_at if old is not None else None))
            if rows:
                conn.execute(self._upsert(accounts_table), rows)
        return added, changed

    def remove_account(self, name: str) -> bool:
        """Take the account out of the database; its sync state stays (see purge_account)."""
        with write(self.engine) as conn:
            return bool(conn.execute(sa.delete(accounts_table).where(accounts_table.c.name == name)).rowcount)

    @staticmethod
    def _account_row(record: AccountRecord, added_at: str | None = None) -> dict:
        return {"name": record.name, "username": record.username, "email": record.email,
                "areas": ",".join(record.areas), "added_at": added_at or record.added_at or _now()}

    @staticmethod
    def _state_tables() -> list[sa.Table]:
        """The tables that hold an account's sync state (locks included: a lock of the account's own)."""
        return [table for table in metadata.sorted_tables if "account" in table.c]

    def account_state(self, name: str) -> dict[str, int]:
        """How many rows of sync state the account has, per table (tables without any left out)."""
        counts = {}
        with self._read() as conn:
            for table in self._state_tables():
                found = conn.execute(sa.select(sa.func.count()).select_from(table)
                                     .where(table.c.account == name)).scalar()
                if found:
                    counts[table.name] = int(found)
        return counts

    def purge_account(self, name: str) -> dict[str, int]:
        """Delete the account's sync state, every table in one transaction; returns the rows
        deleted per table. Its mail and calendars on the servers and its CRM records stay."""
        counts = {}
        with write(self.engine) as conn:
            for table in self._state_tables():
                gone = conn.execute(sa.delete(table).where(table.c.account == name)).rowcount
                if gone:
                    counts[table.name] = int(gone)
        return counts

    # -- runs --------------------------------------------------------------------------------

    def record_run(self, account: str, area: str, ok: bool, summary: dict, error: str | None) -> None:
        """The latest run of an area; `last_success` survives failed runs after it."""
        now = _now()
        statement = self._upsert(runs, update=["finished_at", "ok", "summary", "error"], kept=["last_success"])
        with write(self.engine) as conn:
            conn.execute(statement, {"account": account, "area": area, "finished_at": now, "ok": int(ok),
                                     "summary": json.dumps(summary), "error": error,
                                     "last_success": now if ok else None})

    def runs(self) -> list[dict]:
        return [dict(row, summary=json.loads(row["summary"] or "{}"))
                for row in self._dicts(sa.select(runs).order_by(runs.c.account, runs.c.area))]

    def close(self) -> None:
        self._read.close()
        self.engine.dispose()
