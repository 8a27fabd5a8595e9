"""The embedded CRM store: SQLite (through sqlite-utils) plus content-addressed document files.

Identities are never reused: activity ids come from AUTOINCREMENT (a deleted activity's id is
never given out again), every activity has a random `uuid` (which tells activities apart even
after a restore from an older backup rewinds the id counter), and the store has a UUID of its
own in the `meta` table.

The schema is made and upgraded by MIGRATIONS (see gwsync/migrations.py), in the order it grew.
Version 1 was the first one recorded: a database at 0 may be of any release before it, so the
steps of version 1 check what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import sqlite_utils

from ..errors import file_fault
from ..storage.migrations import Migration, add_column, latest, upgrade
from ..storage.sqlite import ensure_private_dir, open_private_db, transaction
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

# The address an activity is assigned by (Activity.correspondent): an outgoing mail's first
# recipient, To then Cc; else the sender.
_CORRESPONDENT = ("unicode_lower(CASE WHEN kind = 'MAILAUS' THEN coalesce(json_extract(recipients_to, '$[0]'), "
                  "json_extract(recipients_cc, '$[0]')) ELSE sender END)")
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


def _new_id(cursor: sqlite3.Cursor) -> int:
    """The id the INSERT just run on this cursor gave its row."""
    assert cursor.lastrowid is not None  # set by every INSERT
    return cursor.lastrowid


def _made(record: _T | None) -> _T:
    """A record this connection has just written, read back."""
    assert record is not None
    return record


def _json_list(values: list[str]) -> str | None:
    return json.dumps(values, ensure_ascii=False) if values else None


def _json_attendees(attendees: list[Attendee]) -> str | None:
    return json.dumps([asdict(a) for a in attendees], ensure_ascii=False) if attendees else None


def _now_precise() -> str:
    """For updated_at, which the `newest` conflict policy compares."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class EmbeddedCRM(CRMBackend):
    def __init__(self, database: Path, documents: Path, statuses: dict[str, str], link: str):
        self.conn = open_private_db(database, "CRM database")
        self.conn.create_function("unicode_lower", 1, _lower, deterministic=True)
        self.db = sqlite_utils.Database(self.conn)
        self.documents = DocumentStore(documents)
        self._statuses = dict(statuses)
        self.link_template = link
        self._store_id: str | None = None
        try:
            upgrade(self.db, MIGRATIONS)
        except BaseException:
            self.conn.close()
            raise

    def store_id(self) -> str:
        if self._store_id is None:
            self._store_id = self.conn.execute("SELECT value FROM meta WHERE name = 'store_id'").fetchone()[0]
        return self._store_id

    # -- lookups -----------------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        return dict(self._statuses)

    def find_contact_by_email(self, address: str) -> Contact | None:
        row = self.conn.execute(
            "SELECT c.id, c.name, c.partner_id FROM communications m JOIN contacts c ON c.id = m.contact_id "
            "WHERE m.kind = 'email' AND unicode_lower(m.value) = ? ORDER BY m.is_default DESC, c.id LIMIT 1",
            (address.strip().lower(),),
        ).fetchone()
        return self._contact(row) if row else None

    def find_partner_by_domain(self, domain: str) -> Partner | None:
        rows = self.conn.execute(
            "SELECT DISTINCT partner_id FROM partner_addresses WHERE domain = ?", (domain.strip().lower(),)
        ).fetchall()
        if len(rows) != 1:  # none, or ambiguous: better unassigned than wrongly assigned
            return None
        return self.get_partner(rows[0][0])

    def get_partner(self, partner_id: int) -> Partner | None:
        row = self.conn.execute("SELECT id, name FROM partners WHERE id = ?", (partner_id,)).fetchone()
        if not row:
            return None
        emails = [r[0] for r in self.conn.execute(
            "SELECT email FROM partner_addresses WHERE partner_id = ? ORDER BY id", (partner_id,))]
        return Partner(id=row[0], name=row[1], emails=emails)

    def get_contact(self, contact_id: int) -> Contact | None:
        row = self.conn.execute("SELECT id, name, partner_id FROM contacts WHERE id = ?", (contact_id,)).fetchone()
        return self._contact(row) if row else None

    def list_partners(self) -> list[Partner]:
        emails: dict[int, list[str]] = {}
        for partner_id, email in self.conn.execute("SELECT partner_id, email FROM partner_addresses ORDER BY id"):
            emails.setdefault(partner_id, []).append(email)
        return [Partner(id=pid, name=name, emails=emails.get(pid, []))
                for pid, name in self.conn.execute("SELECT id, name FROM partners ORDER BY name, id")]

    def list_contacts(self) -> list[Contact]:
        emails: dict[int, list[str]] = {}
        for contact_id, value in self.conn.execute(
                "SELECT contact_id, value FROM communications WHERE kind = 'email' ORDER BY is_default DESC, id"):
            emails.setdefault(contact_id, []).append(value)
        return [Contact(id=cid, name=name, partner_id=partner_id, emails=emails.get(cid, []))
                for cid, name, partner_id in self.conn.execute(
                    "SELECT id, name, partner_id FROM contacts ORDER BY name, id")]

    def _contact(self, row) -> Contact:
        emails = [r[0] for r in self.conn.execute(
            "SELECT value FROM communications WHERE contact_id = ? AND kind = 'email' ORDER BY is_default DESC, id",
            (row[0],))]
        return Contact(id=row[0], name=row[1], partner_id=row[2], emails=emails)

    def existing_keys(self, keys: Iterable[str]) -> dict[str, int]:
        keys = list(keys)
        found: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, activity_id in self.conn.execute(
                    f"SELECT key, id FROM activities WHERE key IN ({marks})", chunk):
                found[key] = activity_id
        return found

    # -- writes ------------------------------------------------------------------------------

    def create_activities(self, drafts: list[ActivityDraft]) -> list[int]:
        return [activity_id for activity_id, _ in self.create_activities_marked(drafts)]

    def create_activities_marked(self, drafts: list[ActivityDraft]) -> list[tuple[int, bool]]:
        ids: list[tuple[int, bool]] = []
        now = _now()
        with transaction(self.conn):
            for draft in drafts:
                row = self.conn.execute("SELECT id FROM activities WHERE key = ?", (draft.key,)).fetchone()
                if row:
                    ids.append((row[0], False))
                    continue
                cur = self.conn.execute(
                    "INSERT INTO activities (key, kind, status, subject, body, location, contact_id, partner_id, "
                    "sender, unassigned, message_id, start, end, due, source, imported_at, created_at, owner, "
                    "rrule, updated_at, body_html, uuid, sender_name, recipients_to, recipients_cc, "
                    "participants, delegated_to, request, project, attendees, private) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (draft.key, draft.kind, draft.status, draft.subject, draft.body, draft.location,
                     draft.contact_id, draft.partner_id, draft.sender, int(draft.unassigned),
                     draft.message_id, draft.start, draft.end, draft.due, draft.source,
                     now if draft.source and draft.kind in MAIL_KINDS else None, now, draft.owner, draft.rrule,
                     _now_precise(), draft.body_html, str(uuid.uuid4()), draft.sender_name,
                     _json_list(draft.recipients_to), _json_list(draft.recipients_cc),
                     _json_list(draft.participants), draft.delegated_to, draft.request, draft.project,
                     _json_attendees(draft.attendees), int(draft.private)),
                )
                activity_id = _new_id(cur)
                for doc in draft.documents:
                    self.conn.execute(
                        "INSERT INTO documents (activity_id, filename, content_type, size, sha256, category, keyword) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (activity_id, doc.filename, doc.content_type, doc.size, doc.sha256, doc.category,
                         doc.keyword))
                ids.append((activity_id, True))
        return ids

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
        sets = ", ".join(f'"{name}" = ?' for name in changes)
        with transaction(self.conn):
            cur = self.conn.execute(f"UPDATE activities SET {sets}, updated_at = ? WHERE id = ?",
                                    [*changes.values(), _now_precise(), activity_id])
        if cur.rowcount == 0:
            raise LookupError(f"no activity with id {activity_id}")

    def add_participant(self, activity_id: int, name: str) -> bool:
        return self._change_participants(activity_id, name, add=True)

    def remove_participant(self, activity_id: int, name: str) -> bool:
        return self._change_participants(activity_id, name, add=False)

    def _change_participants(self, activity_id: int, name: str, add: bool) -> bool:
        with transaction(self.conn):  # BEGIN IMMEDIATE: the read and the write are one step
            row = self.conn.execute("SELECT participants FROM activities WHERE id = ?", (activity_id,)).fetchone()
            if row is None:
                raise LookupError(f"no activity with id {activity_id}")
            names = json.loads(row[0] or "[]")
            if (name in names) == add:
                return False
            names = [*names, name] if add else [n for n in names if n != name]
            self.conn.execute("UPDATE activities SET participants = ? WHERE id = ?",
                              (_json_list(names), activity_id))
        return True

    def delete_activity(self, activity_id: int) -> None:
        with transaction(self.conn):
            self.conn.execute("DELETE FROM documents WHERE activity_id = ?", (activity_id,))
            self.conn.execute("DELETE FROM activities WHERE id = ?", (activity_id,))

    def put_document(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        return self.documents.put(chunks)

    def add_partner(self, name: str, emails: list[str]) -> Partner:
        with transaction(self.conn):
            partner_id = _new_id(self.conn.execute(
                "INSERT INTO partners (name, created_at) VALUES (?, ?)", (name, _now())))
            for addr in emails:
                addr = addr.strip().lower()
                domain = addr.rsplit("@", 1)[-1]
                self.conn.execute("INSERT INTO partner_addresses (partner_id, email, domain) VALUES (?,?,?)",
                                  (partner_id, addr, domain))
        return _made(self.get_partner(partner_id))

    def add_contact(self, name: str, email: str, partner_id: int | None = None) -> Contact:
        if partner_id is not None and self.get_partner(partner_id) is None:
            raise LookupError(f"no partner with id {partner_id}")
        with transaction(self.conn):
            contact_id = _new_id(self.conn.execute(
                "INSERT INTO contacts (name, partner_id, created_at) VALUES (?,?,?)",
                (name, partner_id, _now())))
            self.conn.execute(
                "INSERT INTO communications (contact_id, kind, value, is_default) VALUES (?, 'email', ?, 1)",
                (contact_id, email.strip().lower()))
        return _made(self.get_contact(contact_id))

    def add_contact_email(self, contact_id: int, email: str) -> Contact:
        contact = self.get_contact(contact_id)
        if contact is None:
            raise LookupError(f"no contact with id {contact_id}")
        email = email.strip().lower()
        if email not in contact.emails:
            with transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO communications (contact_id, kind, value, is_default) VALUES (?, 'email', ?, 0)",
                    (contact_id, email))
        return _made(self.get_contact(contact_id))

    def unassigned_senders(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.conn.execute(
            f"SELECT {_CORRESPONDENT} AS address, count(*) FROM activities WHERE unassigned = 1 "
            "GROUP BY address HAVING address IS NOT NULL ORDER BY count(*) DESC, address")}

    def link_activities_from(self, address: str, contact_id: int, partner_id: int | None) -> int:
        with transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE activities SET contact_id = ?, partner_id = COALESCE(partner_id, ?), unassigned = 0, "
                f"updated_at = ? WHERE {_CORRESPONDENT} = ? AND contact_id IS NULL",
                (contact_id, partner_id, _now_precise(), address.strip().lower()))
        return cur.rowcount

    # -- reads -------------------------------------------------------------------------------

    def _documents(self, activity_ids: list[int]) -> dict[int, list[Document]]:
        """Documents of many activities in one query per 500 ids (not one query per activity)."""
        found: dict[int, list[Document]] = {}
        for start in range(0, len(activity_ids), 500):
            chunk = activity_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for d in self.db.query(f"SELECT * FROM documents WHERE activity_id IN ({marks}) ORDER BY id", chunk):
                found.setdefault(d["activity_id"], []).append(Document(
                    filename=d["filename"], content_type=d["content_type"], size=d["size"], sha256=d["sha256"],
                    category=d["category"], keyword=d["keyword"]))
        return found

    def _activity(self, row: dict, docs: list[Document] | None = None) -> Activity:
        if docs is None:
            docs = self._documents([row["id"]]).get(row["id"], [])
        return Activity(
            id=row["id"], kind=row["kind"], status=row["status"], subject=row["subject"] or "",
            body=row["body"] or "", location=row["location"], contact_id=row["contact_id"],
            partner_id=row["partner_id"], sender=row["sender"], unassigned=bool(row["unassigned"]),
            message_id=row["message_id"], start=row["start"], end=row["end"], due=row["due"],
            link=self.link_template.format(id=row["id"]), imported_at=row["imported_at"],
            source=row["source"], documents=docs, owner=row.get("owner"), rrule=row.get("rrule"),
            updated_at=row.get("updated_at"), key=row["key"], body_html=row.get("body_html"),
            uuid=row.get("uuid"), sender_name=row.get("sender_name"),
            recipients_to=json.loads(row.get("recipients_to") or "[]"),
            recipients_cc=json.loads(row.get("recipients_cc") or "[]"),
            participants=json.loads(row.get("participants") or "[]"), delegated_to=row.get("delegated_to"),
            request=row.get("request"), project=row.get("project"),
            attendees=attendees_from(json.loads(row.get("attendees") or "[]")), private=bool(row.get("private")),
        )

    def get_activity(self, activity_id: int) -> Activity | None:
        rows = list(self.db.query("SELECT * FROM activities WHERE id = ?", [activity_id]))
        return self._activity(rows[0]) if rows else None

    def list_activities(self, flt: ActivityFilter) -> list[Activity]:
        where, params = self._where(flt)
        sql = "SELECT * FROM activities" + where + (" ORDER BY id DESC" if flt.newest_first else " ORDER BY id")
        if flt.limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [flt.limit, flt.offset]
        elif flt.offset:
            sql += " LIMIT -1 OFFSET ?"
            params.append(flt.offset)
        rows = list(self.db.query(sql, params))
        docs = self._documents([row["id"] for row in rows])
        return [self._activity(row, docs.get(row["id"], [])) for row in rows]

    def count_activities(self, flt: ActivityFilter) -> int:
        where, params = self._where(flt)
        return self.conn.execute("SELECT count(*) FROM activities" + where, params).fetchone()[0]

    @staticmethod
    def _where(flt: ActivityFilter) -> tuple[str, list]:
        where, params = [], []
        if flt.imported:
            where.append("imported_at IS NOT NULL")
        if flt.unassigned:
            where.append("unassigned = 1")
        if flt.imported_since:
            where.append("imported_at >= ?")
            params.append(flt.imported_since)
        if flt.kind:
            where.append("kind = ?")
            params.append(flt.kind)
        if flt.kinds is not None:
            where.append(f"kind IN ({','.join('?' * len(flt.kinds)) or 'NULL'})")
            params.extend(flt.kinds)
        if flt.owners is not None:
            named = [o for o in flt.owners if o is not None]
            clauses = [f"owner IN ({','.join('?' * len(named))})"] if named else []
            if None in flt.owners:
                clauses.append("owner IS NULL")
            where.append("(" + (" OR ".join(clauses) or "0") + ")")
            params.extend(named)
        if flt.involving is not None:
            where.append("(owner = ? OR delegated_to = ? OR EXISTS "
                         "(SELECT 1 FROM json_each(activities.participants) WHERE value = ?))")
            params.extend([flt.involving] * 3)
        for column in ("partner_id", "contact_id"):
            if getattr(flt, column) is not None:
                where.append(f"{column} = ?")
                params.append(getattr(flt, column))
        return (" WHERE " + " AND ".join(where) if where else ""), params

    def document_path(self, sha256: str) -> Path:
        """Where a stored document's bytes are (for serving them)."""
        return self.documents.path_for(sha256)

    def close(self) -> None:
        self.conn.close()
