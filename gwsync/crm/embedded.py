"""The CRM store: an embedded SQLite file or a shared PostgreSQL database (one code path, on
SQLAlchemy Core; see gwsync/storage/database.py), plus content-addressed document files.

Identities are never reused: activity ids come from AUTOINCREMENT (a deleted activity's id is
never given out again), every activity has a random `uuid` (which tells activities apart even
after a restore from an older backup rewinds the id counter), and the store has a UUID of its
own in the `meta` table.

The schema is made and upgraded by MIGRATIONS (see gwsync/migrations.py), in the order it grew.
Version 1 was the first one recorded: a database at 0 may be of any release before it, so the
steps of version 1 check what is there. On PostgreSQL a new database is made at POSTGRES_FIRST
from the table definitions below (the steps before it are SQLite's history); a later step
brings its own PostgreSQL statements (Migration.postgres), run under an advisory lock.

Order of work on open: the engine (a file or a URL), the schema upgrade, then every method
takes a pooled connection for its statements (one explicit transaction per write).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
import sqlite_utils
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..errors import file_fault
from ..storage.database import Readers, pg_upgrade, postgres_engine, shown, sqlite_engine, write
from ..storage.migrations import Migration, add_column, latest, postgres_steps, upgrade
from ..storage.sqlite import ensure_private_dir
from . import (
    MAIL_KINDS,
    TEAM_FIELDS,
    Activity,
    ActivityDraft,
    ActivityFilter,
    Attendee,
    Contact,
    CRMBackend,
    Document,
    Partner,
    attendees_from,
)

_T = TypeVar("_T")

# The activities table as of schema version 1. A later column is a later migration (ALTER
# TABLE), never an entry here: the version 1 rebuild must make the same table on every database.
ACTIVITY_COLUMNS = {
    "id": int, "key": str, "kind": str, "status": str, "subject": str, "body": str, "location": str,
    "contact_id": int, "partner_id": int, "sender": str, "unassigned": int, "message_id": str,
    "start": str, "end": str, "due": str, "source": str, "imported_at": str, "created_at": str,
    "owner": str, "rrule": str, "updated_at": str, "body_html": str, "uuid": str,
}
ACTIVITY_REFERENCES = {"contact_id": "contacts", "partner_id": "partners"}
FIRST_ACTIVITY_COLUMNS = dict(list(ACTIVITY_COLUMNS.items())[:list(ACTIVITY_COLUMNS).index("owner")])

# The partner and contact pages of the web view list activities by these.
LOOKUP_INDEXES = (("sender",), ("imported_at",), ("partner_id",), ("contact_id",))


def _first_release(db: sqlite_utils.Database) -> None:
    db.table("partners").create({"id": int, "name": str, "created_at": str}, pk="id", if_not_exists=True)
    db.table("partner_addresses").create(
        {"id": int, "partner_id": int, "email": str, "domain": str}, pk="id",
        foreign_keys=[("partner_id", "partners", "id")], if_not_exists=True)
    db.table("partner_addresses").create_index(["domain"], if_not_exists=True)
    db.table("contacts").create({"id": int, "name": str, "partner_id": int, "created_at": str}, pk="id",
                          foreign_keys=[("partner_id", "partners", "id")], if_not_exists=True)
    db.table("communications").create(
        {"id": int, "contact_id": int, "kind": str, "value": str, "is_default": int}, pk="id",
        foreign_keys=[("contact_id", "contacts", "id")], if_not_exists=True)
    db.table("communications").create_index(["value"], if_not_exists=True)
    db.table("activities").create(FIRST_ACTIVITY_COLUMNS, pk="id", foreign_keys=[
        (column, table, "id") for column, table in ACTIVITY_REFERENCES.items()], if_not_exists=True)
    db.table("activities").create_index(["key"], unique=True, if_not_exists=True)
    db.table("activities").create_index(["sender"], if_not_exists=True)
    db.table("activities").create_index(["imported_at"], if_not_exists=True)
    db.table("documents").create(
        {"id": int, "activity_id": int, "filename": str, "content_type": str, "size": int,
         "sha256": str, "category": str, "keyword": str}, pk="id",
        foreign_keys=[("activity_id", "activities", "id")], if_not_exists=True)
    db.table("documents").create_index(["activity_id"], if_not_exists=True)


def _calendar_columns(db: sqlite_utils.Database) -> None:
    for column in ("owner", "rrule", "updated_at"):
        add_column(db, "activities", column, str)


def _web_view_columns(db: sqlite_utils.Database) -> None:
    add_column(db, "activities", "body_html", str)
    for column in ("partner_id", "contact_id"):
        db.table("activities").create_index([column], if_not_exists=True)


def _activities_table_sql(name: str) -> str:
    """The activities table: AUTOINCREMENT, so that SQLite never hands out a deleted row's id
    again (a plain INTEGER PRIMARY KEY reuses the highest one)."""
    columns = ['"id" INTEGER PRIMARY KEY AUTOINCREMENT']
    for column, kind in ACTIVITY_COLUMNS.items():
        if column != "id":
            reference = f' REFERENCES "{ACTIVITY_REFERENCES[column]}"("id")' if column in ACTIVITY_REFERENCES else ""
            columns.append(f'"{column}" {"INTEGER" if kind is int else "TEXT"}{reference}')
    return f'CREATE TABLE "{name}" (\n   ' + ",\n   ".join(columns) + "\n)"


def _never_reused_ids(db: sqlite_utils.Database) -> None:
    """SQLite cannot add AUTOINCREMENT to a table, so the activities table is rebuilt (new table,
    copy, drop, rename, indexes; the ids are copied unchanged, so the documents' references stay
    valid) and every activity gets a uuid. The store gets its identity in `meta`, made once; a
    copy of the file (a backup) keeps it."""
    conn = db.conn
    old_columns = {row[1] for row in conn.execute("PRAGMA table_info(activities)")}
    conn.execute(_activities_table_sql("activities_rebuilt"))
    copied = ", ".join(f'"{c}"' for c in ACTIVITY_COLUMNS if c in old_columns)
    conn.execute(f"INSERT INTO activities_rebuilt ({copied}) SELECT {copied} FROM activities")
    conn.execute("DROP TABLE activities")
    conn.execute("ALTER TABLE activities_rebuilt RENAME TO activities")
    missing = [row[0] for row in conn.execute("SELECT id FROM activities WHERE uuid IS NULL")]
    conn.executemany("UPDATE activities SET uuid = ? WHERE id = ?",
                     [(str(uuid.uuid4()), activity_id) for activity_id in missing])
    conn.execute('CREATE UNIQUE INDEX "idx_activities_key" ON "activities" ("key")')
    conn.execute('CREATE UNIQUE INDEX "idx_activities_uuid" ON "activities" ("uuid")')
    for (column,) in LOOKUP_INDEXES:
        conn.execute(f'CREATE INDEX "idx_activities_{column}" ON "activities" ("{column}")')
    # Inserting explicit ids moves the counter already; make it explicit all the same.
    top = conn.execute("SELECT coalesce(max(id), 0) FROM activities").fetchone()[0]
    if conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'activities'",
                    (top,)).rowcount == 0:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('activities', ?)", (top,))
    conn.execute('CREATE TABLE "meta" ("name" TEXT PRIMARY KEY, "value" TEXT)')
    conn.execute("INSERT INTO meta (name, value) VALUES ('store_id', ?)", (str(uuid.uuid4()),))


def _mail_recipients(db: sqlite_utils.Database) -> None:
    """To and Cc as JSON lists of addresses (NULL: none), the sender's display name."""
    for column in ("sender_name", "recipients_to", "recipients_cc"):
        db.conn.execute(f'ALTER TABLE activities ADD COLUMN "{column}" TEXT')


def _team_columns(db: sqlite_utils.Database) -> None:
    """Participants and attendees as JSON lists (NULL: none); delegate, request and project;
    the private mark."""
    for column in ("participants", "delegated_to", "request", "project", "attendees"):
        db.conn.execute(f'ALTER TABLE activities ADD COLUMN "{column}" TEXT')
    db.conn.execute('ALTER TABLE activities ADD COLUMN "private" INTEGER NOT NULL DEFAULT 0')
    db.conn.execute('CREATE INDEX "idx_activities_delegated_to" ON "activities" ("delegated_to")')


MIGRATIONS = [
    Migration(1, "partners, contacts, activities, documents: the first release", _first_release),
    Migration(1, "activities: owner, rrule, updated_at (calendar sync)", _calendar_columns),
    Migration(1, "activities: body_html; indexes on partner_id and contact_id (web view)", _web_view_columns),
    Migration(1, "activities rebuilt with AUTOINCREMENT and a uuid each; the store id in meta", _never_reused_ids),
    Migration(2, "activities: sender_name, recipients_to, recipients_cc (mail recipients)", _mail_recipients),
    Migration(3, "activities: participants, delegated_to, request, project, attendees (a team)", _team_columns),
]

SCHEMA_VERSION = latest(MIGRATIONS)


class DocumentStore:
    """Files named by their sha256 below one directory. Names from mail never touch the disk."""

    def __init__(self, root: Path):
        self.root = root
        with self._writing():
            ensure_private_dir(root)

    @contextmanager
    def _writing(self):
        """Errors of the file system (disk full, read-only) become StoreError naming the store."""
        try:
            yield
        except OSError as exc:
            fault = file_fault(exc, self.root, "document store")
            if fault is None:
                raise
            raise fault from exc

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self._writing():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            out = os.fdopen(fd, "wb")
            try:
                for chunk in chunks:  # errors of the source (the IMAP connection) pass as they are
                    digest.update(chunk)
                    size += len(chunk)
                    with self._writing():
                        out.write(chunk)
                with self._writing():
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                try:
                    out.close()
                except OSError:
                    pass  # a full disk fails the flush again: the error above says so already
            sha = digest.hexdigest()
            target = self.path_for(sha)
            with self._writing():
                if target.exists():
                    os.unlink(tmp)
                else:
                    target.parent.mkdir(exist_ok=True, mode=0o700)
                    os.replace(tmp, target)  # atomic: a crash leaves either nothing or the whole file
            return sha, size
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _lower(value):
    """SQLite's lower() folds ASCII only; addresses compare as Python's str.lower (see gwsync.crm)."""
    return value.lower() if isinstance(value, str) else value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _now_precise() -> str:
    """For updated_at, which the `newest` conflict policy compares."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _made(record: _T | None) -> _T:
    """A record this connection has just written, read back."""
    assert record is not None
    return record


def _json(value: list | None) -> str | None:
    """JSON lists are written as text on both databases (NULL for none): PostgreSQL casts it
    to jsonb, and no per-value conversion runs in SQLAlchemy."""
    return json.dumps(value, ensure_ascii=False) if value else None


def _json_list(values: list[str]) -> str | None:
    return _json(list(values))


def _json_attendees(attendees: list[Attendee]) -> str | None:
    return _json([asdict(a) for a in attendees])


def _listed(value) -> list:
    """A JSON list column as read: text from SQLite, already decoded by psycopg from jsonb."""
    if isinstance(value, str):
        return json.loads(value)
    return value or []


# -- the tables, as SQLAlchemy sees them ---------------------------------------------------------------
#
# The statements of EmbeddedCRM are built on these and compiled for SQLite or PostgreSQL. They
# describe the schema at SCHEMA_VERSION: on SQLite MIGRATIONS make it (and every older file
# reaches it); on PostgreSQL `metadata.create_all` makes it in a new database, and a later
# version's step must say what it does there too (Migration.postgres).

metadata = sa.MetaData()
# BIGINT identities on PostgreSQL (a sequence never hands out a number twice); INTEGER on SQLite,
# where the migrations made the tables (AUTOINCREMENT for activities).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _postgresql():
    """SQLAlchemy's PostgreSQL dialect, imported when a store uses it (not for an SQLite file)."""
    from sqlalchemy.dialects import postgresql

    return postgresql


class _JsonText(sa.types.TypeDecorator):
    """A JSON list column: TEXT holding JSON on SQLite (as the migrations made it), jsonb on
    PostgreSQL. Values pass as JSON text both ways (see _json, _listed): SQLAlchemy converts
    nothing, which keeps reading 10,000 activities as fast as plain sqlite3 was."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect):
        return dialect.type_descriptor(_postgresql().JSONB() if dialect.name == "postgresql" else sa.Text())

    def bind_processor(self, dialect):
        return None

    def result_processor(self, dialect, coltype):
        return None


_JSON = _JsonText()


def _id_column() -> sa.Column:
    return sa.Column("id", _ID, sa.Identity(), primary_key=True)


partners = sa.Table("partners", metadata, _id_column(), sa.Column("name", sa.Text),
                    sa.Column("created_at", sa.Text))
partner_addresses = sa.Table(
    "partner_addresses", metadata, _id_column(), sa.Column("partner_id", _ID, sa.ForeignKey("partners.id")),
    sa.Column("email", sa.Text), sa.Column("domain", sa.Text),
    sa.Index("idx_partner_addresses_domain", "domain"))
contacts = sa.Table("contacts", metadata, _id_column(), sa.Column("name", sa.Text),
                    sa.Column("partner_id", _ID, sa.ForeignKey("partners.id")), sa.Column("created_at", sa.Text))
communications = sa.Table(
    "communications", metadata, _id_column(), sa.Column("contact_id", _ID, sa.ForeignKey("contacts.id")),
    sa.Column("kind", sa.Text), sa.Column("value", sa.Text), sa.Column("is_default", sa.Integer),
    sa.Index("idx_communications_value", "value"))
activities = sa.Table(
    "activities", metadata, _id_column(),
    *(sa.Column(name, sa.Integer if kind is int else sa.Text) if name not in ACTIVITY_REFERENCES else
      sa.Column(name, _ID, sa.ForeignKey(f"{ACTIVITY_REFERENCES[name]}.id"))
      for name, kind in ACTIVITY_COLUMNS.items() if name != "id"),
    sa.Column("sender_name", sa.Text), sa.Column("recipients_to", _JSON), sa.Column("recipients_cc", _JSON),
    sa.Column("participants", _JSON), sa.Column("delegated_to", sa.Text), sa.Column("request", sa.Text),
    sa.Column("project", sa.Text), sa.Column("attendees", _JSON),
    sa.Column("private", sa.Integer, nullable=False, server_default="0"),
    sa.Index("idx_activities_key", "key", unique=True), sa.Index("idx_activities_uuid", "uuid", unique=True),
    *(sa.Index(f"idx_activities_{column}", column) for (column,) in (*LOOKUP_INDEXES, ("delegated_to",))),
)
documents_table = sa.Table(
    "documents", metadata, _id_column(), sa.Column("activity_id", _ID, sa.ForeignKey("activities.id")),
    sa.Column("filename", sa.Text), sa.Column("content_type", sa.Text), sa.Column("size", sa.BigInteger),
    sa.Column("sha256", sa.Text), sa.Column("category", sa.Text), sa.Column("keyword", sa.Text),
    sa.Index("idx_documents_activity_id", "activity_id"))
meta = sa.Table("meta", metadata, sa.Column("name", sa.Text, primary_key=True), sa.Column("value", sa.Text))

# The columns an activity is read with, in the order EmbeddedCRM._activity unpacks them.
_READ = [activities.c[name] for name in (
    "id", "kind", "status", "subject", "body", "location", "contact_id", "partner_id", "sender", "unassigned",
    "message_id", "start", "end", "due", "imported_at", "source", "owner", "rrule", "updated_at", "key", "body_html",
    "uuid", "sender_name", "recipients_to", "recipients_cc", "participants", "delegated_to", "request", "project",
    "attendees", "private")]


def _create_postgres(conn: sa.Connection) -> None:
    """A new PostgreSQL database: the tables at SCHEMA_VERSION and the store's identity."""
    metadata.create_all(conn)
    # `involving` (participants @> '["bob"]') is answered by this index. Not in the table
    # definition: a PostgreSQL-only option there would load that dialect for SQLite files too.
    conn.exec_driver_sql('CREATE INDEX "idx_activities_participants" ON "activities" USING gin ("participants")')
    conn.execute(sa.insert(meta).values(name="store_id", value=str(uuid.uuid4())))



# The version the first PostgreSQL databases were made at: the steps up to it are SQLite's history.
POSTGRES_FIRST = 3


class EmbeddedCRM(CRMBackend):
    """The CRM store on an SQLite file (`database` a Path) or on PostgreSQL (`database` a
    postgresql:// URL, `password` a callable giving its password or None). One code path: the
    statements are SQLAlchemy Core, compiled for either; the few that differ say why."""

    def __init__(self, database: Path | str, documents: Path, statuses: dict[str, str], link: str,
                 password: Callable[[], str | None] | None = None):
        self.documents = DocumentStore(documents)
        self._statuses = dict(statuses)
        self.link_template = link
        self._store_id: str | None = None
        self._compiled: dict[str, tuple[str, Callable | None]] = {}
        self._compiled_reads: dict = {}
        if isinstance(database, str):
            self.engine = postgres_engine(database, "CRM database", password)
            self._postgres = True
        else:
            self.engine = sqlite_engine(database, "CRM database", {"unicode_lower": _lower})
            self._postgres = False
        self._read = Readers(self.engine)
        try:
            self._upgrade(database)
        except BaseException:
            self.engine.dispose()
            raise

    def _upgrade(self, database: Path | str) -> None:
        if not self._postgres:
            with self.engine.connect() as conn:  # the migrations are written against sqlite-utils
                raw = conn.connection.dbapi_connection
                assert isinstance(raw, sqlite3.Connection)  # sqlite_engine's, from open_private_db
                upgrade(sqlite_utils.Database(raw), MIGRATIONS)
            return
        pg_upgrade(self.engine, "crm", SCHEMA_VERSION, "CRM database", shown(str(database)), _create_postgres,
                   postgres_steps(MIGRATIONS, POSTGRES_FIRST))

    def _lower(self, value):
        """lower() as Python's str.lower: PostgreSQL's folds every letter (in a UTF-8 database);
        SQLite's only ASCII, so there it is a function of ours."""
        return sa.func.lower(value) if self._postgres else sa.func.unicode_lower(value)

    def store_id(self) -> str:
        if self._store_id is None:
            self._store_id = self._scalar(sa.select(meta.c.value).where(meta.c.name == "store_id"))
        return self._store_id

    def _rows(self, statement, **parameters) -> list:
        with self._read() as conn:
            return list(conn.execute(statement, parameters))

    def _maps(self, statement) -> list:
        with self._read() as conn:
            return list(conn.execute(statement).mappings())

    def _scalar(self, statement):
        with self._read() as conn:
            return conn.execute(statement).scalar()

    # -- lookups -----------------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        return dict(self._statuses)

    # The statements run once per mail or item are built once per store (cached_property), with
    # parameters: building a SQLAlchemy statement costs about five times running it.

    @functools.cached_property
    def _by_email(self):
        m, c = communications, contacts
        return (sa.select(c.c.id, c.c.name, c.c.partner_id).join_from(m, c, c.c.id == m.c.contact_id)
                .where(m.c.kind == "email", self._lower(m.c.value) == sa.bindparam("address"))
                .order_by(m.c.is_default.desc(), c.c.id).limit(1))

    @functools.cached_property
    def _by_domain(self):
        a = partner_addresses.c
        return sa.select(a.partner_id).distinct().where(a.domain == sa.bindparam("domain"))

    @functools.cached_property
    def _partner_row(self):
        return sa.select(partners.c.id, partners.c.name).where(partners.c.id == sa.bindparam("id"))

    @functools.cached_property
    def _partner_emails(self):
        a = partner_addresses.c
        return sa.select(a.email).where(a.partner_id == sa.bindparam("id")).order_by(a.id)

    @functools.cached_property
    def _contact_row(self):
        c = contacts.c
        return sa.select(c.id, c.name, c.partner_id).where(c.id == sa.bindparam("id"))

    @functools.cached_property
    def _contact_emails(self):
        m = communications.c
        return (sa.select(m.value).where(m.contact_id == sa.bindparam("id"), m.kind == "email")
                .order_by(m.is_default.desc(), m.id))

    def _fetch(self, conn: sa.Connection, statement, **parameters) -> list[tuple]:
        """The rows of one of the statements above, run by the driver itself: compiled once per
        store, its parameters filled in by SQLAlchemy's compiled form. For the lookups made
        for every mail, where SQLAlchemy's execution took more than SQLite's own work."""
        compiled = self._compiled_reads.get(statement)
        if compiled is None:
            compiled = self._compiled_reads[statement] = statement.compile(dialect=self.engine.dialect)
        values = compiled.construct_params(parameters)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]  # a checked-out connection
        try:
            cursor.execute(str(compiled), tuple(values[name] for name in compiled.positiontup)
                           if compiled.positiontup else values)
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def find_contact_by_email(self, address: str) -> Contact | None:
        with self._read() as conn:
            rows = self._fetch(conn, self._by_email, address=address.strip().lower())
            return self._contact(conn, rows[0]) if rows else None

    def find_partner_by_domain(self, domain: str) -> Partner | None:
        with self._read() as conn:
            rows = self._fetch(conn, self._by_domain, domain=domain.strip().lower())
        if len(rows) != 1:  # none, or ambiguous: better unassigned than wrongly assigned
            return None
        return self.get_partner(rows[0][0])

    def get_partner(self, partner_id: int) -> Partner | None:
        with self._read() as conn:
            rows = self._fetch(conn, self._partner_row, id=partner_id)
            if not rows:
                return None
            emails = [r[0] for r in self._fetch(conn, self._partner_emails, id=partner_id)]
        return Partner(id=rows[0][0], name=rows[0][1], emails=emails)

    def get_contact(self, contact_id: int) -> Contact | None:
        with self._read() as conn:
            rows = self._fetch(conn, self._contact_row, id=contact_id)
            return self._contact(conn, rows[0]) if rows else None

    def list_partners(self) -> list[Partner]:
        emails: dict[int, list[str]] = {}
        for partner_id, email in self._rows(sa.select(partner_addresses.c.partner_id, partner_addresses.c.email)
                                            .order_by(partner_addresses.c.id)):
            emails.setdefault(partner_id, []).append(email)
        return [Partner(id=pid, name=name, emails=emails.get(pid, []))
                for pid, name in self._rows(sa.select(partners.c.id, partners.c.name)
                                            .order_by(partners.c.name, partners.c.id))]

    def list_contacts(self) -> list[Contact]:
        m = communications
        emails: dict[int, list[str]] = {}
        for contact_id, value in self._rows(sa.select(m.c.contact_id, m.c.value).where(m.c.kind == "email")
                                            .order_by(m.c.is_default.desc(), m.c.id)):
            emails.setdefault(contact_id, []).append(value)
        return [Contact(id=cid, name=name, partner_id=partner_id, emails=emails.get(cid, []))
                for cid, name, partner_id in self._rows(
                    sa.select(contacts.c.id, contacts.c.name, contacts.c.partner_id)
                    .order_by(contacts.c.name, contacts.c.id))]

    def _contact(self, conn: sa.Connection, row) -> Contact:
        emails = [r[0] for r in self._fetch(conn, self._contact_emails, id=row[0])]
        return Contact(id=row[0], name=row[1], partner_id=row[2], emails=emails)

    def existing_keys(self, keys: Iterable[str]) -> dict[str, int]:
        with self._read() as conn:
            return self._existing(conn, list(keys))

    def _among(self, column):
        """column IN (:values) as one parameter, however many values (see _values): an array on
        PostgreSQL, a JSON list read by json_each on SQLite (no statement per 500 values)."""
        if self._postgres:
            return column == sa.any_(sa.bindparam("values", type_=_postgresql().ARRAY(sa.Text)))
        listed = sa.func.json_each(sa.bindparam("values", type_=sa.Text)).table_valued("value").alias("listed")
        return column.in_(sa.select(listed.c.value))

    def _values(self, values: list) -> dict:
        """The parameter of _among."""
        return {"values": list(values) if self._postgres else json.dumps(values)}

    @functools.cached_property
    def _keys_found(self):
        a = activities.c
        return sa.select(a.key, a.id, a.uuid).where(self._among(a.key))

    # -- writes ------------------------------------------------------------------------------

    def create_activities(self, drafts: list[ActivityDraft]) -> list[int]:
        return [activity_id for activity_id, _ in self.create_activities_marked(drafts)]

    def create_activities_marked(self, drafts: list[ActivityDraft]) -> list[tuple[int, bool]]:
        """One transaction: the drafts whose key is new are inserted with ON CONFLICT DO NOTHING,
        so of two processes writing one key at once (PostgreSQL's READ COMMITTED lets both get
        this far) one row is made; each new row carries a uuid made here, so reading the keys
        back tells exactly which rows this call made (created=True) and which another did."""
        if not drafts:
            return []
        now = _now()
        first = list({draft.key: draft for draft in reversed(drafts)}.values())[::-1]  # first of each key
        created: dict[str, int] = {}
        with write(self.engine) as conn:
            existing = self._existing(conn, [d.key for d in first])
            new = [self._row(draft, now) for draft in first if draft.key not in existing]
            if new:
                self._insert_many(conn, "activities", new)
                ours = {row["key"]: row["uuid"] for row in new}
                for key, activity_id, made in conn.execute(self._keys_found, self._values(list(ours))).all():
                    if made == ours[key]:
                        created[key] = activity_id
                    else:  # another process wrote this key just now
                        existing[key] = activity_id
                docs = [{"activity_id": created[d.key], "filename": doc.filename, "content_type": doc.content_type,
                         "size": doc.size, "sha256": doc.sha256, "category": doc.category, "keyword": doc.keyword}
                        for d in first if d.key in created for doc in d.documents]
                if docs:
                    self._insert_many(conn, "documents", docs)
        ids, marked, seen = {**existing, **created}, [], set()
        for draft in drafts:  # created: the first draft of a key this call inserted
            marked.append((ids[draft.key], draft.key in created and draft.key not in seen))
            seen.add(draft.key)
        return marked

    def _insert_many(self, conn: sa.Connection, table: str, rows: list[dict]) -> None:
        """Many rows at once through the driver's executemany, with plain values: the INSERT
        (... ON CONFLICT (key) DO NOTHING for activities) is compiled once for this database.
        SQLAlchemy's per-row parameter handling cost more than SQLite's own insert."""
        if table not in self._compiled:
            statement = self._insert(metadata.tables[table])
            if table == "activities":
                statement = statement.on_conflict_do_nothing(index_elements=["key"])
            compiled = statement.compile(dialect=self.engine.dialect, column_keys=list(rows[0]))
            order = compiled.positiontup if compiled.positional else None
            self._compiled[table] = (str(compiled), operator.itemgetter(*order) if order else None)
        sql, values = self._compiled[table]
        conn.exec_driver_sql(sql, list(map(values, rows)) if values is not None else rows)

    def _existing(self, conn: sa.Connection, keys: list[str]) -> dict[str, int]:
        if not keys:
            return {}
        return {key: activity_id for key, activity_id, _ in conn.execute(self._keys_found, self._values(keys))}

    def _insert(self, table: sa.Table):
        """INSERT with ON CONFLICT: each dialect's own construct, the same statement."""
        return _postgresql().insert(table) if self._postgres else sqlite_insert(table)

    @staticmethod
    def _row(draft: ActivityDraft, now: str) -> dict:
        return {
            "key": draft.key, "kind": draft.kind, "status": draft.status, "subject": draft.subject,
            "body": draft.body, "location": draft.location, "contact_id": draft.contact_id,
            "partner_id": draft.partner_id, "sender": draft.sender, "unassigned": int(draft.unassigned),
            "message_id": draft.message_id, "start": draft.start, "end": draft.end, "due": draft.due,
            "source": draft.source, "imported_at": now if draft.source and draft.kind in MAIL_KINDS else None,
            "created_at": now, "owner": draft.owner, "rrule": draft.rrule, "updated_at": _now_precise(),
            "body_html": draft.body_html, "uuid": str(uuid.uuid4()), "sender_name": draft.sender_name,
            "recipients_to": _json_list(draft.recipients_to), "recipients_cc": _json_list(draft.recipients_cc),
            "participants": _json_list(draft.participants), "delegated_to": draft.delegated_to,
            "request": draft.request, "project": draft.project, "attendees": _json_attendees(draft.attendees),
            "private": int(draft.private)}

    EDITABLE = ("kind", "status", "subject", "body", "location", "start", "end", "due", "rrule", "contact_id",
                "partner_id", "owner", "unassigned", *TEAM_FIELDS)

    def update_activity(self, activity_id: int, changes: dict) -> None:
        unknown = set(changes) - set(self.EDITABLE)
        if unknown:
            raise ValueError(f"cannot edit {', '.join(sorted(unknown))}")
        if not changes:
            if self.get_activity(activity_id) is None:
                raise LookupError(f"no activity with id {activity_id}")
            return
        changes = dict(changes)
        if "participants" in changes:
            changes["participants"] = _json_list(list(dict.fromkeys(changes["participants"] or [])))
        if "attendees" in changes:
            changes["attendees"] = _json_attendees(attendees_from(changes["attendees"] or []))
        if "private" in changes:
            changes["private"] = int(bool(changes["private"]))
        if "unassigned" in changes and isinstance(changes["unassigned"], bool):
            changes["unassigned"] = int(changes["unassigned"])
        with write(self.engine) as conn:
            count = conn.execute(sa.update(activities).where(activities.c.id == activity_id)
                                 .values(**changes, updated_at=_now_precise())).rowcount
        if count == 0:
            raise LookupError(f"no activity with id {activity_id}")

    def add_participant(self, activity_id: int, name: str) -> bool:
        return self._change_participants(activity_id, name, add=True)

    def remove_participant(self, activity_id: int, name: str) -> bool:
        return self._change_participants(activity_id, name, add=False)

    def _change_participants(self, activity_id: int, name: str, add: bool) -> bool:
        """The read and the write are one step: BEGIN IMMEDIATE on SQLite, the row locked
        (SELECT ... FOR UPDATE) on PostgreSQL, so two processes adding names both count."""
        with write(self.engine) as conn:
            row = conn.execute(sa.select(activities.c.participants).where(activities.c.id == activity_id)
                               .with_for_update()).first()
            if row is None:
                raise LookupError(f"no activity with id {activity_id}")
            names = _listed(row[0])
            if (name in names) == add:
                return False
            names = [*names, name] if add else [n for n in names if n != name]
            conn.execute(sa.update(activities).where(activities.c.id == activity_id)
                         .values(participants=_json_list(names)))
        return True

    def delete_activity(self, activity_id: int) -> None:
        with write(self.engine) as conn:
            conn.execute(sa.delete(documents_table).where(documents_table.c.activity_id == activity_id))
            conn.execute(sa.delete(activities).where(activities.c.id == activity_id))

    def put_document(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        return self.documents.put(chunks)

    def add_partner(self, name: str, emails: list[str]) -> Partner:
        with write(self.engine) as conn:
            partner_id = conn.execute(sa.insert(partners).values(name=name, created_at=_now())
                                      .returning(partners.c.id)).scalar_one()
            for addr in emails:
                addr = addr.strip().lower()
                conn.execute(sa.insert(partner_addresses).values(partner_id=partner_id, email=addr,
                                                                 domain=addr.rsplit("@", 1)[-1]))
        return _made(self.get_partner(partner_id))

    def add_contact(self, name: str, email: str, partner_id: int | None = None) -> Contact:
        if partner_id is not None and self.get_partner(partner_id) is None:
            raise LookupError(f"no partner with id {partner_id}")
        with write(self.engine) as conn:
            contact_id = conn.execute(sa.insert(contacts).values(name=name, partner_id=partner_id, created_at=_now())
                                      .returning(contacts.c.id)).scalar_one()
            conn.execute(sa.insert(communications).values(contact_id=contact_id, kind="email",
                                                          value=email.strip().lower(), is_default=1))
        return _made(self.get_contact(contact_id))

    def add_contact_email(self, contact_id: int, email: str) -> Contact:
        contact = self.get_contact(contact_id)
        if contact is None:
            raise LookupError(f"no contact with id {contact_id}")
        email = email.strip().lower()
        if email not in contact.emails:
            with write(self.engine) as conn:
                conn.execute(sa.insert(communications).values(contact_id=contact_id, kind="email", value=email,
                                                              is_default=0))
        return _made(self.get_contact(contact_id))

    def _correspondent(self):
        """The address an activity is assigned by (Activity.correspondent): an outgoing mail's
        first recipient, To then Cc; else the sender."""
        a = activities.c
        first = [sa.type_coerce(column, _postgresql().JSONB if self._postgres else sa.JSON)[0].as_string()
                 for column in (a.recipients_to, a.recipients_cc)]
        return self._lower(sa.case((a.kind == MAIL_KINDS[1], sa.func.coalesce(*first)), else_=a.sender))

    def unassigned_senders(self) -> dict[str, int]:
        # A subquery, so that GROUP BY names the column and not the expression again (PostgreSQL
        # does not see two expressions with separate parameters as the same).
        sub = sa.select(self._correspondent().label("address")).where(activities.c.unassigned == 1).subquery()
        count = sa.func.count()
        return {address: n for address, n in self._rows(
            sa.select(sub.c.address, count).group_by(sub.c.address).having(sub.c.address.is_not(None))
            .order_by(count.desc(), sub.c.address))}

    def link_activities_from(self, address: str, contact_id: int, partner_id: int | None) -> int:
        a = activities.c
        with write(self.engine) as conn:
            return conn.execute(
                sa.update(activities).where(self._correspondent() == address.strip().lower(), a.contact_id.is_(None))
                .values(contact_id=contact_id, partner_id=sa.func.coalesce(a.partner_id, partner_id), unassigned=0,
                        updated_at=_now_precise())).rowcount

    # -- reads -------------------------------------------------------------------------------

    @functools.cached_property
    def _documents_of(self):
        d = documents_table.c
        return (sa.select(d.activity_id, d.filename, d.content_type, d.size, d.sha256, d.category, d.keyword)
                .where(d.activity_id.in_(sa.bindparam("ids", expanding=True))).order_by(d.id))

    def _documents(self, conn: sa.Connection, activity_ids: list[int]) -> dict[int, list[Document]]:
        """Documents of many activities in one query per 500 ids (not one query per activity)."""
        found: dict[int, list[Document]] = {}
        for start in range(0, len(activity_ids), 500):
            for activity_id, *fields in conn.execute(self._documents_of, {"ids": activity_ids[start:start + 500]}):
                found.setdefault(activity_id, []).append(Document(*fields))
        return found

    def _activity(self, row: tuple, docs: list[Document]) -> Activity:
        """An activity from a row of _READ's columns."""
        (id_, kind, status, subject, body, location, contact_id, partner_id, sender, unassigned, message_id, start,
         end, due, imported_at, source, owner, rrule, updated_at, key, body_html, uuid_, sender_name, recipients_to,
         recipients_cc, participants, delegated_to, request, project, attendees, private) = row
        return Activity(
            id=id_, kind=kind, status=status, subject=subject or "", body=body or "", location=location,
            contact_id=contact_id, partner_id=partner_id, sender=sender, unassigned=bool(unassigned),
            message_id=message_id, start=start, end=end, due=due, link=self.link_template.format(id=id_),
            imported_at=imported_at, source=source, documents=docs, owner=owner, rrule=rrule, updated_at=updated_at,
            key=key, body_html=body_html, uuid=uuid_, sender_name=sender_name, recipients_to=_listed(recipients_to),
            recipients_cc=_listed(recipients_cc), participants=_listed(participants), delegated_to=delegated_to,
            request=request, project=project, attendees=attendees_from(_listed(attendees)), private=bool(private))

    def _activities(self, statement, parameters: dict | None = None) -> list[Activity]:
        with self._read() as conn:
            # The driver's rows as they come: no column here needs a conversion by SQLAlchemy
            # (see _JsonText), and its Row objects would take longer than the rest together.
            rows = conn.execute(statement, parameters).cursor.fetchall()
            docs = self._documents(conn, [row[0] for row in rows])
        return [self._activity(row, docs.get(row[0], [])) for row in rows]

    @functools.cached_property
    def _by_id(self):
        return sa.select(*_READ).where(activities.c.id == sa.bindparam("id"))

    def get_activity(self, activity_id: int) -> Activity | None:
        found = self._activities(self._by_id, {"id": activity_id})
        return found[0] if found else None

    def list_activities(self, flt: ActivityFilter) -> list[Activity]:
        statement = sa.select(*_READ).where(*self._where(flt)).order_by(
            activities.c.id.desc() if flt.newest_first else activities.c.id)
        if flt.limit is not None:
            statement = statement.limit(flt.limit)
        if flt.offset:
            statement = statement.offset(flt.offset)
        return self._activities(statement)

    def count_activities(self, flt: ActivityFilter) -> int:
        return self._scalar(sa.select(sa.func.count()).select_from(activities).where(*self._where(flt)))

    def _where(self, flt: ActivityFilter) -> list:
        a = activities.c
        where: list = []
        if flt.imported:
            where.append(a.imported_at.is_not(None))
        if flt.unassigned:
            where.append(a.unassigned == 1)
        if flt.imported_since:
            where.append(a.imported_at >= flt.imported_since)
        if flt.kind:
            where.append(a.kind == flt.kind)
        if flt.kinds is not None:
            where.append(a.kind.in_(flt.kinds) if flt.kinds else sa.false())
        if flt.owners is not None:
            named = [o for o in flt.owners if o is not None]
            clauses = [a.owner.in_(named)] if named else []
            if None in flt.owners:
                clauses.append(a.owner.is_(None))
            where.append(sa.or_(*clauses) if clauses else sa.false())
        if flt.involving is not None:
            where.append(sa.or_(a.owner == flt.involving, a.delegated_to == flt.involving,
                                self._participant(flt.involving)))
        for column in ("partner_id", "contact_id"):
            if getattr(flt, column) is not None:
                where.append(a[column] == getattr(flt, column))
        return where

    def _participant(self, name: str):
        """`name` is one of the participants: jsonb containment on PostgreSQL (its GIN index
        answers it), json_each on SQLite."""
        if self._postgres:
            return sa.type_coerce(activities.c.participants, _postgresql().JSONB).contains([name])
        return sa.exists(sa.select(sa.literal(1)).select_from(
            sa.func.json_each(activities.c.participants).table_valued("value").alias("p"))
            .where(sa.column("value") == name))

    def document_path(self, sha256: str) -> Path:
        """Where a stored document's bytes are (for serving them)."""
        return self.documents.path_for(sha256)

    def close(self) -> None:
        self._read.close()
        self.engine.dispose()
