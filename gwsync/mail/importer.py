"""The mail import pipeline (README: "What an import does"): import folders on IMAP -> MAILEIN activities in the CRM.

Crash safety comes from the order of work, per batch of mails:
  1. fetch (BODY.PEEK) and parse; attachments go to the content-addressed document store;
  2. create the activities in ONE CRM transaction, each under its idempotency key;
  3. record the outcome in the state store;
  4. move the imported mails to the archive folder; 5. forget their state records.
A process killed between any two steps re-runs into the same result: mail still in its folder
whose key the CRM knows is moved, not imported again. A run that lost its account's lock (a
worker frozen past [database] lock_timeout) is refused at 2 or 3 by the stores' fence, and
`before_move` stops it before 4 (gwsync.accountlock).

Only a fault of the mail itself counts against it (retried, then quarantined). A fault of the
environment (StoreError: a full disk, a broken database) stops the run and leaves the mail
where it was; a dropped connection too. A mail that another client expunged meanwhile is skipped.

A team on one CRM: the same mail filed by several employees (same Message-ID, same content; see
mime.MailKeyReader) has one key, so it is one activity. The first filer creates it (owner and
participant); each later filer finds the key, is added as participant (atomic, idempotent) and
archives their copy. Activities made before keep their exact-bytes keys, looked up as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from ..config import AccountConfig, CrmConfig
from ..crm import ActivityDraft, CRMBackend, Document
from ..errors import ConfigError, StoreError
from ..storage.records import FAILED, HELD, IMPORTED, LEFT_OUT, QUARANTINED, MailRecord
from ..storage.state import StateStore
from .decisions import MailMatch, SenderMatch, Step, failure_outcome, missing_fields, plan_mail, resolve_mail
from .imap import FETCH_BATCH, ImapSession, ImportFolder, MailGone, MailServerError, ServerUnreachable
from .mime import (
    Attachment,
    MailKeyReader,
    MailKeys,
    MailReader,
    ParsedMail,
    content_key,
    mail_keys,
    parse_header_block,
    parse_headers,
    parse_message,
)

# Mails above this size are streamed part by part instead of fetched whole, which keeps peak
# memory flat whatever the attachment size.
STREAM_THRESHOLD = 8 << 20
BATCH_BYTES = 16 << 20
# A text body larger than this becomes a document instead of the activity's body.
MAX_STREAMED_TEXT = 2 << 20

ProgressFn = Callable[[int, int, str], None]


@dataclass
class ImportedActivity:
    id: int
    link: str
    subject: str
    folder: str
    unassigned: bool = False


@dataclass
class MailResult:
    imported: int = 0
    held: int = 0
    failed: int = 0
    archived_again: int = 0  # imported by an earlier, interrupted run; only moved now
    activities: list[ImportedActivity] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line each: folder, item, reason
    quarantined: int = 0

    def counts(self) -> dict:
        return {"imported": self.imported, "held": self.held, "failed": self.failed}


@dataclass
class PendingMail:
    """A mail waiting in an import folder, as the review shows it."""

    folder: str
    uid: int
    status: str
    sender: str | None
    subject: str
    body: str
    attachments: list[str]
    contact_id: int | None
    partner_id: int | None
    missing: list[str]
    left_out: bool = False  # left out by an earlier review: it stays out until a review takes it in


@dataclass
class _Prepared:
    uid: int
    key: str  # the exact-bytes key: the state record's, and what archive copies are compared by
    activity_key: str  # the activity's idempotency key (by Message-ID and content, see MailKeyReader)
    draft: ActivityDraft | None = None
    record: MailRecord | None = None  # held or failed outcome
    known_activity: int | None = None  # the CRM had this key already


def own_status(account: AccountConfig, crm_cfg: CrmConfig) -> str | None:
    """The status of mail lying in the import folder itself ([crm] default_status); None
    without an import_folder: then the import root's own mail (INBOX's) is never imported."""
    return crm_cfg.default_status if account.imap is not None and account.imap.import_folder else None


class MailImporter:
    def __init__(self, account: AccountConfig, crm_cfg: CrmConfig, crm: CRMBackend, state: StateStore,
                 dry_run: bool = False, progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 before_move: Callable[[], None] | None = None,
                 selection: set[tuple[str, int]] | None = None,
                 overrides: dict[tuple[str, int], dict] | None = None,
                 left_out: dict[tuple[str, int], tuple[str | None, str]] | None = None):
        self.should_stop = should_stop or (lambda: False)
        # Raises (StoreError) when the run lost its account's lock: no mail moves after that.
        self.before_move = before_move or (lambda: None)
        # The interactive review: only these (folder, UID) are imported, with fields filled in
        # by the user ("partner_id", "contact_id", "subject", "body", "documents": [(category,
        # keyword), ...]).
        self.selection = selection
        self.overrides = overrides or {}
        # The mails the review leaves out, (folder, UID) -> (sender, subject): recorded, so that
        # they stay in their folders until a review takes them in (`selection` names them then).
        self.left_out = left_out or {}
        self.account = account
        if account.imap is None:
            raise ConfigError(f"accounts.{account.name} has no [accounts.{account.name}.imap] table")
        self.imap_cfg = account.imap
        self.crm_cfg = crm_cfg
        self.crm = crm
        self.state = state
        self.dry_run = dry_run
        self.progress = progress or (lambda done, total, what: None)
        self.statuses = crm.statuses()
        # What the run has done so far: complete when run() returns, and what was committed
        # when it ends early (a dropped connection, a full disk), so that it is still reported.
        self.result = MailResult()
        self.archive = ""  # the archive folder's full name on the server, known once run() is connected
        self._fresh_lookups()

    def _fresh_lookups(self) -> None:
        """The CRM's contact of an address and partner of a domain, asked once per batch: the mails
        of a batch often share senders, and each lookup is a query. A contact added meanwhile
        counts from the next batch, as if it had been added a moment later."""
        self._find_contact = cache(self.crm.find_contact_by_email)
        self._find_partner = cache(self.crm.find_partner_by_domain)

    @property
    def own_status(self) -> str | None:
        return own_status(self.account, self.crm_cfg)

    # -- entry point -------------------------------------------------------------------------

    def run(self, session: ImapSession) -> MailResult:
        result = self.result = MailResult()
        if not self.dry_run:
            session.ensure_import_folder(self.imap_cfg)
        folders = session.import_folders(self.imap_cfg.import_root, self.own_status)
        self.archive = session.archive_folder(self.imap_cfg)
        if not self.dry_run:
            session.ensure_folder(self.archive)
            self.state.forget_folders_except(self.account.name, [f.name for f in folders])
        for folder in folders:
            if self.should_stop():
                break
            if folder.status not in self.statuses:
                known = ", ".join(sorted(self.statuses))
                result.errors.append(
                    f"account {self.account.name}, folder {folder.name!r}: status key [{folder.status}] is "
                    f"unknown to the CRM (known: {known}); rename the folder or add the key to [crm.statuses]")
                continue
            try:
                self._import_folder(session, folder, result)
            except (ServerUnreachable, IMAPClientAbortError):
                raise
            except (MailServerError, IMAPClientError) as exc:  # e.g. the folder vanished meanwhile
                result.errors.append(f"account {self.account.name}, folder {folder.name!r}: {exc}")
        return result

    # -- one folder --------------------------------------------------------------------------

    def _import_folder(self, session: ImapSession, folder: ImportFolder, result: MailResult) -> None:
        account = self.account.name
        uidvalidity = session.select(folder.name)
        if not self.dry_run:
            self.state.check_uidvalidity(account, folder.name, uidvalidity)
        uids = session.uids()
        records = self.state.records(account, folder.name, uidvalidity)
        present = set(uids)
        if not self.dry_run:
            self.state.forget(account, folder.name, uidvalidity, [u for u in records if u not in present])

        to_process, to_move, left_out = [], [], []
        for uid in uids:
            step = plan_mail(records.get(uid))
            chosen = self.selection is not None and (folder.name, uid) in self.selection
            if step is Step.LEFT_OUT and chosen:
                step = Step.PROCESS  # taken in by this review
            if step is Step.PROCESS and (folder.name, uid) in self.left_out:
                left_out.append(uid)  # left out by this review: it stays in its folder, untouched
                continue
            if self.selection is not None and step is Step.PROCESS and not chosen:
                continue  # arrived after the review looked: the next sync imports it
            if step is Step.PROCESS:
                to_process.append(uid)
            elif step is Step.MOVE_ONLY:
                to_move.append(uid)
            elif step is Step.SKIP:
                result.quarantined += 1
        if left_out and not self.dry_run:
            self.state.save([MailRecord(account=account, folder=folder.name, uidvalidity=uidvalidity, uid=uid,
                                        outcome=LEFT_OUT, sender=self.left_out[(folder.name, uid)][0],
                                        subject=self.left_out[(folder.name, uid)][1]) for uid in left_out])
        if to_move:
            result.archived_again += len(to_move)
            self._archive_recovered(session, folder, uidvalidity, {uid: records[uid].key for uid in to_move})

        total = len(to_process)
        done = 0
        self.progress(0, total, folder.name)
        sizes = session.sizes(to_process) if to_process else {}
        small = [u for u in to_process if sizes.get(u, 0) <= STREAM_THRESHOLD and u in sizes]
        large = [u for u in to_process if sizes.get(u, 0) > STREAM_THRESHOLD]
        for batch in _batches(small, sizes):
            if self.should_stop():
                return  # between batches: everything before is committed and archived
            raws = session.fetch_raw(batch)
            keys = {uid: mail_keys(raw) for uid, raw in raws.items()}
            known = self._known(keys.values())
            self._fresh_lookups()
            prepared = []
            for uid in batch:
                if uid not in raws:
                    continue  # expunged by someone else meanwhile
                prepared.append(self._prepare(uid, keys[uid], _known_id(known, keys[uid]), folder,
                                              records.get(uid), partial(parse_message, raws[uid])))
            del raws
            self._commit(session, folder, uidvalidity, prepared, result)
            done += len(batch)
            self.progress(done, total, folder.name)
        for uid in large:
            if self.should_stop():
                return
            self._fresh_lookups()
            try:
                key = self._streamed_keys(session, uid, sizes[uid])
                prepared = [self._prepare(uid, key, _known_id(self._known([key]), key), folder, records.get(uid),
                                          _StreamedMail(session, uid, self.crm, self.dry_run).parse)]
            except MailGone:
                continue  # expunged by someone else meanwhile
            self._commit(session, folder, uidvalidity, prepared, result)
            done += 1
            self.progress(done, total, folder.name)

    def preview(self, session: ImapSession) -> list[PendingMail]:
        """The mail waiting in the import folders, parsed and resolved, without importing it."""
        pending: list[PendingMail] = []
        statuses = self.statuses
        for folder in session.import_folders(self.imap_cfg.import_root, self.own_status):
            if folder.status not in statuses:
                continue
            uidvalidity = session.examine(folder.name)
            records = self.state.records(self.account.name, folder.name, uidvalidity)
            steps = {u: plan_mail(records.get(u)) for u in session.uids()}
            uids = [u for u, step in steps.items() if step in (Step.PROCESS, Step.LEFT_OUT)]
            sizes = session.sizes(uids) if uids else {}
            for uid in [u for u in uids if sizes.get(u, 0) > STREAM_THRESHOLD]:  # large: headers only
                try:
                    headers = parse_headers(parse_header_block(session.fetch_section(uid, "HEADER")), [])
                except MailGone:
                    continue
                match = self._resolve(headers["sender"], headers["to"], headers["cc"]).match
                pending.append(PendingMail(
                    folder=folder.name, uid=uid, status=folder.status, sender=headers["sender"],
                    subject=headers["subject"], body="", attachments=[f"({sizes[uid] >> 20} MB mail)"],
                    contact_id=match.contact_id, partner_id=match.partner_id,
                    missing=[m for m in missing_fields(self.crm_cfg.mandatory, partner_id=match.partner_id,
                                                       contact_id=match.contact_id, subject=headers["subject"],
                                                       body="x") if m != "body"],
                    left_out=steps[uid] is Step.LEFT_OUT))
            for batch in _batches([u for u in uids if sizes.get(u, 0) <= STREAM_THRESHOLD], sizes):
                raws = session.fetch_raw(batch)
                keys = {uid: mail_keys(raw) for uid, raw in raws.items()}
                known = self._known(keys.values())
                self._fresh_lookups()
                for uid in batch:
                    if uid not in raws or _known_id(known, keys[uid]) is not None:
                        continue  # in the CRM already (filed by another employee, say): joined, not new
                    parsed = parse_message(raws[uid])
                    match = self._resolve(parsed.sender, parsed.to, parsed.cc).match
                    pending.append(PendingMail(
                        folder=folder.name, uid=uid, status=folder.status, sender=parsed.sender,
                        subject=parsed.subject, body=parsed.body,
                        attachments=[a.filename for a in parsed.attachments], contact_id=match.contact_id,
                        partner_id=match.partner_id,
                        missing=missing_fields(self.crm_cfg.mandatory, partner_id=match.partner_id,
                                               contact_id=match.contact_id, subject=parsed.subject,
                                               body=parsed.body),
                        left_out=steps[uid] is Step.LEFT_OUT))
        return pending

    def _known(self, keys: Iterable[MailKeys]) -> dict[str, int]:
        """The activities the CRM has for these mails, by either key: activities imported before
        mail was matched by Message-ID keep their exact-bytes keys."""
        return self.crm.existing_keys(list(dict.fromkeys(k for pair in keys for k in (pair.activity, pair.exact))))

    def _prepare(self, uid: int, keys: MailKeys, known_activity: int | None, folder: ImportFolder,
                 record: MailRecord | None, parse: Callable[[], ParsedMail]) -> _Prepared:
        key = keys.exact
        if known_activity is not None:
            return _Prepared(uid=uid, key=key, activity_key=keys.activity, known_activity=known_activity)
        base = MailRecord(account=self.account.name, folder=folder.name, uidvalidity=0, uid=uid, outcome="",
                          key=key)
        try:
            parsed = parse()
            resolved = self._resolve(parsed.sender, parsed.to, parsed.cc)
            match = resolved.match
            given = self.overrides.get((folder.name, uid), {})
            if given:
                match = SenderMatch(given.get("contact_id", match.contact_id),
                                    given.get("partner_id", match.partner_id))
                parsed.subject = given.get("subject", parsed.subject)
                parsed.body = given.get("body", parsed.body)
            missing = missing_fields(self.crm_cfg.mandatory, partner_id=match.partner_id,
                                     contact_id=match.contact_id, subject=parsed.subject, body=parsed.body)
            # Held for want of a contact: the address to assign (an outgoing mail's recipient).
            base.sender, base.subject = resolved.correspondent, parsed.subject
            if missing:
                base.outcome, base.missing = HELD, missing
                return _Prepared(uid=uid, key=key, activity_key=keys.activity, record=base)
            documents = [self._store(att) for att in parsed.attachments]
            # The review form may name fewer documents than the mail has: the rest keep no category.
            for doc, (category, keyword) in zip(documents, given.get("documents", []), strict=False):
                doc.category, doc.keyword = category or None, keyword or None
            draft = ActivityDraft(
                key=keys.activity, kind=resolved.kind, status=folder.status, subject=parsed.subject, body=parsed.body,
                body_html=parsed.body_html if "body" not in given else None,  # an edited body drops the HTML
                contact_id=match.contact_id, partner_id=match.partner_id, sender=parsed.sender,
                unassigned=match.unassigned, message_id=parsed.message_id, start=parsed.date,
                source=f"{self.account.name}:{folder.name}", owner=self.account.name, documents=documents,
                sender_name=parsed.sender_name or None, recipients_to=parsed.to, recipients_cc=parsed.cc,
                participants=[self.account.name])
            return _Prepared(uid=uid, key=key, activity_key=keys.activity, draft=draft)
        except (ServerUnreachable, IMAPClientAbortError, ConnectionError, TimeoutError, MailGone, StoreError):
            raise  # the connection, the environment, or the mail is gone: never count it against the mail
        except Exception as exc:  # one bad mail must never block the others
            previous = record.attempts if record and record.outcome in (FAILED, QUARANTINED) else 0
            base.outcome, base.attempts = failure_outcome(previous, self.crm_cfg.max_attempts)
            base.error = f"{type(exc).__name__}: {exc}"[:500]
            return _Prepared(uid=uid, key=key, activity_key=keys.activity, record=base)

    def _resolve(self, sender: str | None, to: list[str], cc: list[str]) -> MailMatch:
        """Incoming mail by its sender; mail from the account's own addresses by its recipients."""
        recipients = list(dict.fromkeys(to + cc))
        return resolve_mail(sender, recipients, self.account.addresses, self._find_contact, self._find_partner)

    def _store(self, att: Attachment | Document) -> Document:
        if isinstance(att, Document):  # streamed attachments are stored while being read
            return att
        if self.dry_run:
            sha, size = hashlib.sha256(att.data).hexdigest(), len(att.data)
        else:
            sha, size = self.crm.put_document(iter([att.data]))
        return Document(filename=att.filename, content_type=att.content_type, size=size, sha256=sha)

    def _commit(self, session: ImapSession, folder: ImportFolder, uidvalidity: int, prepared: list[_Prepared],
                result: MailResult) -> None:
        drafts = [p.draft for p in prepared if p.draft is not None]
        records: list[MailRecord] = []
        for p in prepared:
            if p.record is not None:
                p.record.uidvalidity = uidvalidity
                records.append(p.record)
                if p.record.outcome == HELD:
                    result.held += 1
                else:
                    result.failed += 1
                    if p.record.outcome == QUARANTINED:
                        result.errors.append(
                            f"account {self.account.name}, folder {folder.name!r}, mail UID {p.uid}: "
                            f"quarantined after {p.record.attempts} failed attempts ({p.record.error}); "
                            "it stays in the folder")
        if self.dry_run:
            result.imported += len(drafts)
            return
        marked = iter(self.crm.create_activities_marked(drafts) if drafts else [])
        to_move: list[int] = []
        recovered: dict[int, str | None] = {}
        for p in prepared:
            activity_id, created = next(marked) if p.draft is not None else (p.known_activity, False)
            if activity_id is None:
                continue
            if not created:
                # The CRM had it: an earlier run, another process, a copy earlier in this batch, or
                # another employee who filed the same mail. The filer takes part in it, before the
                # state says "imported" (a run that dies here adds them next time).
                try:
                    self.crm.add_participant(activity_id, self.account.name)
                except LookupError:
                    continue  # deleted since: nothing recorded, the next run imports the mail afresh
            records.append(MailRecord(account=self.account.name, folder=folder.name, uidvalidity=uidvalidity,
                                      uid=p.uid, outcome=IMPORTED, key=p.key, activity_id=activity_id))
            if created:  # only what this run created counts as its import
                assert p.draft is not None  # created: from its draft
                to_move.append(p.uid)
                result.imported += 1
                result.activities.append(ImportedActivity(
                    id=activity_id, link=self.crm_cfg.link.format(id=activity_id), subject=p.draft.subject,
                    folder=folder.name, unassigned=p.draft.unassigned))
            else:
                # Its twin may be in the archive already: archive it as recovered.
                recovered[p.uid] = p.key
                result.archived_again += 1
        self.state.save(records)
        self._archive(session, folder, uidvalidity, to_move)
        self._archive_recovered(session, folder, uidvalidity, recovered)

    def _archive(self, session: ImapSession, folder: ImportFolder, uidvalidity: int, uids: list[int]) -> None:
        if self.dry_run or not uids:
            return
        self.before_move()
        session.move(uids, self.archive)
        self.state.forget(self.account.name, folder.name, uidvalidity, uids)

    def _archive_recovered(self, session: ImapSession, folder: ImportFolder, uidvalidity: int,
                           keys: dict[int, str | None]) -> None:
        """Archive mail that the CRM has already: an earlier run died after its commit, or the
        user put an archived mail back. If an identical copy is in the archive already (Dovecot
        leaves one when a client dies inside MOVE), drop this one instead of archiving it twice."""
        if self.dry_run or not keys:
            return
        sizes = session.sizes(list(keys))
        archive = self.archive
        session.examine(archive)
        in_archive: set[str] = set()
        small_candidates: list[int] = []
        for size in sorted({sizes[uid] for uid in keys if uid in sizes}):
            for cand in session.uids_of_size(size):
                if size > STREAM_THRESHOLD:
                    try:
                        in_archive.add(self._streamed_keys(session, cand, size).exact)
                    except MailGone:
                        continue  # expunged from the archive meanwhile: not a copy to keep
                else:
                    small_candidates.append(cand)
        for start in range(0, len(small_candidates), FETCH_BATCH):
            fetched = session.fetch_raw(small_candidates[start:start + FETCH_BATCH])
            in_archive.update(content_key(raw) for raw in fetched.values())
        if session.select(folder.name) != uidvalidity:
            raise MailServerError(f"folder {folder.name!r} was recreated during the sync; run sync again")
        duplicates = [uid for uid, key in keys.items() if uid in sizes and key in in_archive]
        if duplicates:
            self.before_move()
        if duplicates and session.delete_messages(duplicates):
            self.state.forget(self.account.name, folder.name, uidvalidity, duplicates)
            duplicates_set = set(duplicates)
        else:
            duplicates_set = set()
        self._archive(session, folder, uidvalidity, [uid for uid in keys if uid in sizes and uid not in duplicates_set])

    def _streamed_keys(self, session: ImapSession, uid: int, size: int) -> MailKeys:
        reader = MailKeyReader()
        for chunk in session.fetch_chunks(uid, "", size):
            reader.feed(chunk)
        return reader.finish()


def _known_id(known: dict[str, int], keys: MailKeys) -> int | None:
    """The activity of this very mail (its exact bytes) first, else the one of its Message-ID and content."""
    return known.get(keys.exact, known.get(keys.activity))


def _batches(uids: list[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    """Batches of at most FETCH_BATCH mails and BATCH_BYTES bytes (at least one mail each)."""
    batch: list[int] = []
    weight = 0
    for uid in uids:
        if batch and (len(batch) >= FETCH_BATCH or weight + sizes[uid] > BATCH_BYTES):
            yield batch
            batch, weight = [], 0
        batch.append(uid)
        weight += sizes[uid]
    if batch:
        yield batch


class _StreamedMail:
    """Reads a large mail part by part over IMAP (BODYSTRUCTURE + partial fetches)."""

    def __init__(self, session: ImapSession, uid: int, crm: CRMBackend, dry_run: bool):
        self.session = session
        self.uid = uid
        self.crm = crm
        self.dry_run = dry_run

    def parse(self) -> ParsedMail:
        # The same reading as parse_message, fed part by part: the same body and attachment bytes.
        header = parse_header_block(self.session.fetch_section(self.uid, "HEADER"))
        reader = MailReader(header, self._store, max_text=MAX_STREAMED_TEXT)
        structure = self.session.bodystructure(self.uid)
        for section, part in _leaf_sections(structure):
            mime_section = "HEADER" if section == "1" and not structure.is_multipart else f"{section}.MIME"
            size = int(part[6]) if len(part) > 6 and isinstance(part[6], int) else None
            reader.add(parse_header_block(self.session.fetch_section(self.uid, mime_section)),
                       partial(self.session.fetch_chunks, self.uid, section, size), size)
        return reader.finish(lambda name, ctype, stored: Document(filename=name, content_type=ctype,
                                                                   sha256=stored[0], size=stored[1]))

    def _store(self, decoded: Iterator[bytes]) -> tuple[str, int]:
        """Streamed attachments are stored while they are read."""
        if not self.dry_run:
            return self.crm.put_document(decoded)
        digest, total = hashlib.sha256(), 0
        for piece in decoded:
            digest.update(piece)
            total += len(piece)
        return digest.hexdigest(), total


def _leaf_sections(structure, prefix: str = ""):
    if structure.is_multipart:
        for index, part in enumerate(structure[0], 1):
            yield from _leaf_sections(part, f"{prefix}.{index}" if prefix else str(index))
    else:
        yield (prefix or "1"), structure
