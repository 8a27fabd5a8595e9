"""Two-way sync of one account's events or tasks collection with the CRM (README, "What a
calendar sync does"). It plans, then applies.

One run:
  1. read the groupware changes: WebDAV sync (one REPORT with the stored token); when the server
     refuses the token, one full sync-collection for a fresh one; when it has no sync at all
     (SabreDAV 1.8), a full ETag listing, and a marker in place of the token so that the next
     runs list without asking again (they ask once more a day later); changed items are
     fetched in one multiget;
  2. read the CRM side: the activities of the area's kinds the account holds (see "A team" below),
     plus pushed ones;
  3. plan: pairs (link, CRM side, groupware side) -> `reconcile` decisions (pure) -> one typed
     action per pair that has something to do (`Plan`); planning writes nothing anywhere, and
     `sync --dry-run` prints the plan. New server items that are private (`[sync] private =
     "skip"`) or outside the date window get no pair: nothing is imported, nothing written
     into them; items already linked stay linked whatever their CLASS or dates; nor do new items
     the review left out (the engine passes them in `skip_hrefs`, recorded in the state database)
     or that lack a mandatory field (held: see gwsync.calendar.mandatory; read again each run);
  4. the mass-deletion guard, on the plan;
  5. apply: the CRM creates in one transaction, then each action with conditional writes; a 412
     re-reads that item and plans that pair again; each pair's link is saved right after its
     writes, so a crash costs nothing: every step can be repeated (CRM writes are keyed by UID,
     creates on the server by a UID derived from the activity, and an existing item answers a
     repeated create with 412);
  6. save the sync token (not when an action failed, or after a stop; items a review left out are
     recorded, and taking one in drops the token, so that the next run lists the collection),
     with the day the earliest item left out for starting after the window enters it: on that
     day the collection is listed again (the item itself may never change, so no delta lists it).
     The first create on the server drops the stored token: a delta since a token older than an
     item never lists its deletion, so only a token fresher than the run's creates is saved, and
     a run that ends without one (a failed item, a stop, a crash) has the next run list.

Privacy: with `[sync] private = "busy"`, every CLASS:PRIVATE or CONFIDENTIAL item is read as a
busy block (subject "Privat", no description or location), linked or not, so its details
never reach the CRM; gwsync writes no link into such an item (that would rewrite its
description): it stays linked by the state database and by its UID.

A team (several accounts on one CRM): an activity of the area's kinds is held by the account
when, for events, it is the owner or a participant; for tasks, the delegate, or the owner when
there is no delegate, or a participant other than the owner; an activity without owner goes to
the only account syncing the area; pushes and unpushes (memberships) override this. A linked
copy the account no longer holds is released: its edits since the last sync go to the activity,
then the copy is deleted (If-Match) and unlinked (a team calendar's item that another account's
link still holds only loses this account's link). One activity per iCalendar UID: a new
activity from an item gets the key `cal:<UID>`; an unlinked item is first matched by its UID to
an activity another account's copy is linked to, to a key `cal:<UID>` or (from before teams)
`cal:<account>:<UID>`, or by this store's activity uuid written in it; such a copy joins the
activity (the account becomes a participant; its base is the other copy's last synced state),
unless its holder made it private and `[sync] private` is not "import". An activity that came
from an item gets that item's UID in every calendar it is put into.
A linked item gone from the server deletes its activity only when the activity came from a
calendar item (key `cal:`) and no other account's copy and no other employee holds it (and
the CRM side is unchanged: an edit wins, the item comes back). Otherwise the copy is unlinked:
the account is removed from the participants, or, when it holds the activity anyway (owner,
delegate, pushed), it is taken out (a membership, as by unpush). When the deleted copy was the
organizer's (its ORGANIZER is one of the account's addresses) and others hold the activity, its
status becomes `[crm] cancelled_status` first. An event's STATUS:CANCELLED maps to that status
(when it is a status of its own, not the open, done or default one).

Identities: a link records the activity's identity (its uuid, see `Activity.identity`); a link
whose id now names another activity (a CRM restored from an older backup) counts as "its
activity is gone": the item is deleted if unchanged on the server, kept and imported again if
edited there, never rewritten with the other activity. Items gwsync writes carry the store's
identity (X-GWSYNC-STORE) and the activity's uuid; an unlinked item is matched to an activity
by the id written in it only when both are this store's and this activity's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import ClassVar
from urllib.parse import urlsplit

from ..config import AccountConfig, Config
from ..crm import Activity, ActivityDraft, ActivityFilter, Attendee, CRMBackend
from ..mail.decisions import SenderMatch
from ..people import People, employees_by_address, organizer_of, resolve_attendees
from ..storage.records import HELD, CalendarItemRecord, CalendarLink, LinkChange
from ..storage.state import StateStore
from .dav import (
    Collection,
    DavError,
    DavLoginFailed,
    DavUnreachable,
    Item,
    PreconditionFailed,
    SyncTokenInvalid,
    SyncUnsupported,
)
from .icalmap import (
    EVENT,
    FIELDS,
    TODO,
    BrokenItem,
    ItemData,
    Link,
    busy_fields,
    in_window,
    link_is_current,
    new_item,
    read_item,
    uid_for_key,
    update_item,
)
from .reconcile import Decision, Side, guard_deletions, reconcile

log = logging.getLogger("gwsync.calendar")
COUNTS = ("created_crm", "updated_crm", "deleted_crm", "created_groupware", "updated_groupware",
          "deleted_groupware", "conflicts", "unlinked")
MAX_RETRIES = 3
LINK_BATCH = 200
NO_SYNC = "gwsync:no-sync-collection:"  # stored in place of a token, with the time it was found out
NO_SYNC_RECHECK = timedelta(days=1)  # then ask again: the server may have been upgraded
RELIST = "gwsync:relist-on:"  # "<day> <token>": list the collection again on that day


def with_relist(token: str, day: date | None) -> str:
    return f"{RELIST}{day.isoformat()} {token}" if day is not None else token


def split_relist(token: str | None) -> tuple[str | None, date | None]:
    """(the token inside, the day to list again) of a stored token."""
    if not token or not token.startswith(RELIST):
        return token, None
    day, _, inner = token[len(RELIST):].partition(" ")
    try:
        return inner or None, date.fromisoformat(day)
    except ValueError:
        return None, None  # unreadable: list again now


def no_sync_marker(now: datetime | None = None) -> str:
    return NO_SYNC + (now or datetime.now(UTC)).isoformat(timespec="seconds")


def no_sync_since(token: str | None) -> datetime | None:
    """When the collection was found to have no WebDAV sync, if the stored token says so."""
    if not token or not token.startswith(NO_SYNC):
        return None
    try:
        return datetime.fromisoformat(token[len(NO_SYNC):])
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)  # unreadable: ask again


@dataclass
class CalendarResult:
    counts: dict = field(default_factory=lambda: {name: 0 for name in COUNTS})
    errors: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # one line each: item, fields, who won
    requests: int = 0
    plan: list[dict] | None = None  # a dry run's plan (`Action.to_dict` of each action)
    held: int = 0  # new items not imported for want of a mandatory field

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def changes_line(self) -> str:
        """The counts as the sync and watch print them: `CRM +1 ~0 -0, groupware +0 ~2 -0`, and
        `, unlinked N` when copies were unlinked from their activity."""
        c = self.counts
        line = (f"CRM +{c['created_crm']} ~{c['updated_crm']} -{c['deleted_crm']}, "
                f"groupware +{c['created_groupware']} ~{c['updated_groupware']} -{c['deleted_groupware']}")
        return line + (f", unlinked {c['unlinked']}" if c["unlinked"] else "")


@dataclass(frozen=True)
class _Pair:
    link: CalendarLink | None
    activity: Activity | None
    item: Item | None  # fetched this run (data and ETag)
    data: ItemData | None  # item parsed
    gone_on_server: bool = False
    release: bool = False  # linked, but the account no longer holds the activity
    joining: bool = False  # an unlinked copy of an activity the account does not hold yet
    join_base: dict | None = None  # unlinked: the last synced state of another copy, if any


# -- the plan: one typed action per pair ----------------------------------------------------

@dataclass(frozen=True)
class Action:
    """What to do for one pair, as decided by `reconcile`; `run` carries it out."""

    pair: _Pair
    decision: Decision
    name: ClassVar[str] = ""

    def run(self, sync: CalendarSync) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        pair, decision = self.pair, self.decision
        activity = pair.activity.id if pair.activity is not None else (pair.link.activity_id if pair.link else None)
        item = pair.link.href if pair.link else (pair.item.href if pair.item else None)
        subject: str | None
        if pair.activity is not None:
            subject = pair.activity.subject
        elif pair.data is not None:
            subject = pair.data.fields.get("subject")
        else:
            subject = (pair.link.base or {}).get("subject") if pair.link else None
        fields = sorted(set(decision.update_crm) | set(decision.update_groupware))
        return {"action": self.name, "activity": activity, "item": item, "subject": subject or "",
                "fields": fields, "conflicts": list(decision.conflicts)}


class Forget(Action):
    """Gone on both sides: drop the link."""

    name = "forget"

    def run(self, sync: CalendarSync) -> None:
        assert self.pair.link is not None  # "forget" needs a link: gone on both sides since it
        sync._drop(self.pair.link)


class DeleteInCRM(Action):
    name = "delete-crm"

    def run(self, sync: CalendarSync) -> None:
        assert self.pair.activity is not None and self.pair.link is not None  # linked, still in the CRM
        sync.crm.delete_activity(self.pair.activity.id)
        sync._drop(self.pair.link)
        sync.result.counts["deleted_crm"] += 1


class Unlink(Action):
    """The item went from the server, but the activity stays (see "A team" in the module doc)."""

    name = "unlink"

    def run(self, sync: CalendarSync) -> None:
        sync._unlink(self.pair)


class Cancel(Unlink):
    """The organizer's copy went while others hold the meeting: cancelled, and unlinked."""

    name = "cancel"

    def run(self, sync: CalendarSync) -> None:
        sync._cancel(self.pair)


class Release(Action):
    """A copy the account no longer holds: its edits go to the activity, then it is deleted."""

    name = "release"

    def run(self, sync: CalendarSync) -> None:
        sync._release(self.pair, self.decision)


class DeleteOnServer(Action):
    name = "delete-groupware"

    def run(self, sync: CalendarSync) -> None:
        link, item = self.pair.link, self.pair.item
        assert link is not None  # only a linked item is deleted
        # The ETag read this run when there is one: the server may have rewritten it unchanged.
        sync.coll.delete(link.href, (item.etag if item is not None else link.etag) or "*")
        sync._drop(link)
        sync.result.counts["deleted_groupware"] += 1


class CreateInCRM(Action):
    """A new (or, deleted in the CRM, edited) server item becomes an activity; its item gets the link."""

    name = "create-crm"

    def run(self, sync: CalendarSync) -> None:
        sync._create_in_crm(self.pair, self.decision)


class CreateOnServer(Action):
    name = "create-groupware"

    def run(self, sync: CalendarSync) -> None:
        sync._create_on_server(self.pair, self.decision)


class Update(Action):
    """Changes to both sides (different fields); the subclasses below name the other updates."""

    name = "update-both"

    def run(self, sync: CalendarSync) -> None:
        sync._update(self.pair, self.decision)


class UpdateCRM(Update):
    name = "update-crm"


class UpdateGroupware(Update):
    name = "update-groupware"


class Conflict(Update):
    """The same field changed on both sides: settled by `[sync] conflict`, and reported."""

    name = "conflict"


class Join(Update):
    """An unlinked copy of an activity held elsewhere: linked, its account a participant."""

    name = "join"

    def run(self, sync: CalendarSync) -> None:
        sync._join(self.pair, self.decision)


class Relink(Update):
    """No change on either side: the link is written into the item, or the item's new state
    (a new ETag, say) is recorded."""

    name = "link"


def _update_action(decision: Decision) -> type[Update]:
    if decision.conflicts:
        return Conflict
    if decision.update_crm and decision.update_groupware:
        return Update
    if decision.update_crm:
        return UpdateCRM
    return UpdateGroupware if decision.update_groupware else Relink


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    token: str | None  # the sync token to save after applying (None: keep the stored one)
    linked: int  # links before this run, for the mass-deletion guard
    broken: tuple[tuple[str, str | None, str], ...] = ()  # (href, ETag, error) of unreadable items
    recovered: tuple[str, ...] = ()  # items that failed before and read fine now
    identities: tuple[CalendarLink, ...] = ()  # links that get their activity's identity recorded
    relist: date | None = None  # when an item left out for starting after the window enters it
    held: tuple[CalendarItemRecord, ...] = ()  # new items lacking a mandatory field
    checked: tuple[str, ...] = ()  # items read this run: their earlier "held" records go

    def to_list(self) -> list[dict]:
        return [action.to_dict() for action in self.actions]


def plan_line(entry: dict) -> str:
    """One line of a printed plan: action, activity and item, subject, fields."""
    where = ", ".join(part for part in (
        f"activity {entry['activity']}" if entry["activity"] is not None else "",
        f"item {entry['item']}" if entry["item"] is not None else "new item") if part)
    line = f"{entry['action']} {where}: {entry['subject']!r}"
    if entry["fields"]:
        line += f" ({', '.join(entry['fields'])})"
    return line


def calendar_key(uid: str) -> str:
    """The idempotency key of an activity that came from a groupware item: one per UID, whoever's
    collection it came from."""
    return f"cal:{uid}"


def legacy_calendar_key(account: str, uid: str) -> str:
    """The key such an activity got before teams: per account."""
    return f"cal:{account}:{uid}"


class CalendarSync:
    def __init__(self, config: Config, account: AccountConfig, area: str, crm: CRMBackend, state: StateStore,
                 collection: Collection, dry_run: bool = False, force: bool = False,
                 should_stop=None, skip_hrefs: set[str] | None = None):
        self.should_stop = should_stop or (lambda: False)
        self.skip_hrefs = skip_hrefs or set()  # new server items a review left out
        self.config = config
        self.account = account
        self.area = area
        self.crm = crm
        self.state = state
        self.coll = collection
        self.dry_run = dry_run
        self.force = force
        self.component = EVENT if area == "events" else TODO
        self.done = config.crm.done_status
        self.open = config.crm.open_status
        # An event's STATUS:CANCELLED <-> this status (tasks have their own STATUS mapping); not
        # when the config has no status of its own for it (it then falls back to the first one).
        statuses = config.crm
        distinct = statuses.cancelled_status not in (statuses.open_status, statuses.done_status,
                                                     statuses.default_status)
        self.cancelled = statuses.cancelled_status if area == "events" and distinct else None
        self._memberships: dict[int, tuple[bool, str | None]] = {}
        self.result = CalendarResult()
        self.where = f"account {account.name}, {area}"
        # Link changes are written in batches: one transaction per LINK_BATCH items. Losing
        # unwritten ones to a crash costs nothing; the next run matches items and activities.
        self._link_changes: list[LinkChange] = []
        self._created: dict[str, Activity | None] = {}  # key -> the activity this run created for it
        self._made_items = False  # has this run created an item on the server (the token is dropped)?
        self._today = datetime.now(UTC).date()  # for the date window; set again by each plan
        self._relist: date | None = None  # the earliest day an item left out for the future enters it
        self._held: list[CalendarItemRecord] = []  # new items lacking a mandatory field, found by the plan
        self._matches: dict[str, SenderMatch] = {}  # UID -> the contact and partner its attendees give
        self.store = crm.store_id()
        self._employees = employees_by_address(config.accounts.values())

    # -- entry point -------------------------------------------------------------------------

    def run(self) -> CalendarResult:
        start_requests = self.coll.requests
        try:
            plan = self.plan()
            self.result.held = len(plan.held)
            self._note_reads(plan)
            if self.dry_run:
                self.result.plan = plan.to_list()
            if self._guard_ok(plan):
                self.apply(plan)
        finally:
            self._flush_links()
            self.result.requests = self.coll.requests - start_requests
        return self.result

    def _flush_links(self) -> None:
        changes, self._link_changes = self._link_changes, []
        self.state.apply_link_changes(changes)

    def _drop(self, link: CalendarLink) -> None:
        """Drop this link only (by href too): the activity now holding its id may have one of its own."""
        self._link_changes.append(("drop", (self.account.name, self.area, link.activity_id, link.href)))

    def _read(self, item: Item, linked: bool) -> ItemData:
        """Parse an item; gwsync's own properties count on linked items and on this store's.
        A private item is read as a busy block when `[sync] private = "busy"`."""
        data = read_item(item.data or "", self.done, self.open, trusted=linked, store=self.store,
                         kinds=self.config.crm.kinds, cancelled_status=self.cancelled)
        if self._busy(data):
            data = replace(data, fields=busy_fields(data.fields))
        return data

    def _busy(self, data: ItemData) -> bool:
        return data.private and self.config.sync.private == "busy"

    def _left_out(self, data: ItemData, today: date) -> str | None:
        """Why a new server item is not imported: "private", "past", "future"; None: it is."""
        sync = self.config.sync
        if data.private and sync.private == "skip":
            return "private"
        if in_window(data, today, sync.past_days, sync.future_days):
            return None
        return "future" if data.first is not None and data.first > today else "past"

    def _relist_day(self, data: ItemData) -> date:
        assert data.first is not None  # left out for the future: it has a first day
        return data.first - timedelta(days=self.config.sync.future_days)

    def plan(self) -> Plan:
        """Read both sides and decide; writes nothing (not even to the state database)."""
        name, area = self.account.name, self.area
        links = self.state.links(name, area)
        by_href = {l.href: l for l in links}
        token, relist = split_relist(self.state.sync_token(name, area, self.coll.url))
        self._today = datetime.now(UTC).date()
        if relist is not None and relist <= self._today:
            token, relist = None, None  # an item left out for the future enters the window: list again
        self._relist = relist
        new_token, changed, deleted = self._server_changes(token, by_href)
        failures = self.state.item_failures(name, area)
        retry = [h for h, f in failures.items() if f["attempts"] < self.config.crm.max_attempts
                 and h not in deleted and h not in changed]
        # Held items are read again each run: what releases them (a new contact) changes no item.
        retry += [r.href for r in self.state.calendar_items(name, area, HELD)
                  if r.href not in deleted and r.href not in changed and r.href not in retry]
        fetched = self.coll.multiget(sorted(set(changed) | set(retry))) if (changed or retry) else {}
        for href in changed:
            if href not in fetched:
                deleted.add(href)  # listed, then gone before we could read it
        parsed: dict[str, ItemData] = {}
        broken, recovered = [], []
        for href, item in fetched.items():
            try:
                data = self._read(item, linked=href in by_href)
            except BrokenItem as exc:
                broken.append((href, item.etag, str(exc)))
                continue
            if href in failures:
                recovered.append(href)
            if data.component != self.component and href not in by_href:
                continue  # e.g. a VTODO in the events collection: not this area's
            parsed[href] = data
        self._held = []
        pairs, identities = self._pairs(links, fetched, parsed, deleted)
        actions = tuple(a for a in map(self._action_for, pairs) if a is not None)
        return Plan(actions, new_token, len(links), tuple(broken), tuple(recovered), tuple(identities),
                    self._relist, tuple(self._held), tuple(sorted(set(changed) | set(retry))))

    def _note_reads(self, plan: Plan) -> None:
        """What reading found, whatever the guard says: broken items, items readable again."""
        for href, etag, error in plan.broken:
            self._item_failed(href, etag, error)
        if self.dry_run:
            return
        for href in plan.recovered:
            self.state.clear_item_failure(self.account.name, self.area, href)
        self.state.save_calendar_items(plan.held, [(self.account.name, self.area, h) for h in plan.checked], HELD)
        self._link_changes += [("save", link) for link in plan.identities]

    def apply(self, plan: Plan) -> None:
        """Carry out the plan (a dry run counts it), then save the sync token."""
        writes_before = self.coll.writes
        left_out = False
        if not self.dry_run:
            self._create_crm_activities(plan.actions)
        for action in plan.actions:
            if self.should_stop():
                return  # between items; the token stays, so the next run picks up the rest
            if len(self._link_changes) >= LINK_BATCH:
                self._flush_links()
            try:
                self._run_action(action)
            except (DavUnreachable, DavLoginFailed):
                raise
            except (DavError, BrokenItem, ValueError, LookupError) as exc:
                self.result.errors.append(f"{self.where}, {self._describe(action.pair)}: {exc}")
                left_out = True
        # A failed action leaves its item out: keep the old token, so the next run reads it
        # again (an item whose link could not be written would otherwise never be seen again).
        new_token = None if left_out else plan.token
        if not self.dry_run and new_token is not None:
            if self.coll.writes > writes_before:
                new_token = self._past_own_writes(new_token)
            if new_token is not None:
                self.state.save_sync_token(self.account.name, self.area, self.coll.url,
                                           with_relist(new_token, plan.relist))

    def _past_own_writes(self, token: str) -> str | None:
        """After writing, the next delta would list our own writes. Ask once more; when the delta
        holds nothing but them, take the fresher token (so the next sync with no changes reads
        nothing). Anything else in it keeps the older token: no foreign change is ever skipped;
        but after creating items no token is kept (None; see `_before_creating`)."""
        self._flush_links()
        if no_sync_since(token) is not None:
            return token  # no sync-collection: the next run lists anyway
        older = None if self._made_items else token
        current = {l.href: l.etag for l in self.state.links(self.account.name, self.area)}
        try:
            fresh, changed, deleted = self.coll.changes_since(token)
        except SyncTokenInvalid:
            return older
        if all(current.get(href) == etag for href, etag in changed.items()) and not (deleted & set(current)):
            return fresh
        return older

    def _before_creating(self) -> None:
        """Drop the stored token before this run's first create on the server. A delta since a
        token older than an item never lists that item's deletion (RFC 6578 leaves out what was
        made and deleted since), so a copy deleted on the phone before the next run would keep
        its link for ever. A run that ends well saves a token fresher than its creates; one that
        fails an item, stops, dies or keeps an older token leaves none: the next run lists the
        collection. A no-sync marker stays (those runs list anyway)."""
        if self._made_items:
            return
        self._made_items = True
        name, area, url = self.account.name, self.area, self.coll.url
        token, _ = split_relist(self.state.sync_token(name, area, url))
        if token is not None and no_sync_since(token) is None:
            self.state.save_sync_token(name, area, url, None)

    # -- reading the server ------------------------------------------------------------------

    def _server_changes(self, token: str | None, by_href: dict[str, CalendarLink]):
        since = no_sync_since(token)
        if since is not None and datetime.now(UTC) - since < NO_SYNC_RECHECK:
            # No sync-collection here, found out less than a day ago: list, without asking again.
            new_token, changed, complete = token, self.coll.list_etags(), True
            deleted: set[str] = set()
        else:
            new_token, changed, deleted, complete = self._sync_report(None if since else token)
        if complete:
            deleted = {h for h in by_href if h not in changed}
        deleted = {h for h in deleted if h in by_href}
        # Our own writes come back with the ETag we stored: nothing to read.
        changed = {h: e for h, e in changed.items()
                   if h not in deleted and (h not in by_href or by_href[h].etag != e)}
        return new_token, changed, deleted

    def _sync_report(self, token: str | None) -> tuple[str | None, dict[str, str], set[str], bool]:
        """(new token, changed, deleted, complete listing?) by WebDAV sync, or by a listing."""
        try:
            new_token, changed, deleted = self.coll.changes_since(token)
            return new_token, changed, deleted, token is None  # an initial sync-collection lists every item
        except SyncUnsupported:
            log.info("%s: the server has no WebDAV sync; listing the collection", self.where)
            return no_sync_marker(), self.coll.list_etags(), set(), True
        except SyncTokenInvalid:
            # The token expired, or the server forgot it (Radicale answers 403, Xandikos 412):
            # one full sync-collection lists every item and gives a fresh token.
            log.info("%s: sync token refused; listing the collection", self.where)
        try:
            new_token, changed, deleted = self.coll.changes_since(None)
        except SyncUnsupported:
            return no_sync_marker(), self.coll.list_etags(), set(), True
        return new_token, changed, deleted, True

    def _item_failed(self, href: str, etag: str | None, error: str) -> None:
        if self.dry_run:
            self.result.errors.append(f"{self.where}, item {href}: {error}")
            return
        attempts = self.state.record_item_failure(self.account.name, self.area, href, etag, error)
        state = "quarantined until it changes" if attempts >= self.config.crm.max_attempts else \
            f"attempt {attempts} of {self.config.crm.max_attempts}"
        self.result.errors.append(f"{self.where}, item {href}: {error} ({state}); the other items synced")

    # -- pairing -----------------------------------------------------------------------------

    def waiting(self) -> list[tuple[str, ItemData]]:
        """New items on the server that are not in the CRM yet (for the review); a copy of an
        activity another account's copy brought in is not new: the sync joins it."""
        linked = {l.href for l in self.state.links(self.account.name, self.area)}
        hrefs = [h for h in self.coll.list_etags() if h not in linked]
        self._memberships = self.state.membership_details(self.account.name, self.area)
        found = []
        for href, item in sorted(self.coll.multiget(hrefs).items()):
            try:
                data = self._read(item, linked=False)
            except BrokenItem:
                continue
            if data.component == self.component and self._left_out(data, datetime.now(UTC).date()) is None:
                found.append((href, data))
        copies = self._copies([data.uid for _, data in found])
        return [(href, data) for href, data in found
                if copies(data.uid) is None and self._claimed(data, {}, set()) is None]

    def _crm_activities(self) -> dict[int, Activity]:
        """The activities this account holds in this area (module doc, "A team")."""
        self._memberships = self.state.membership_details(self.account.name, self.area)
        kinds = self.config.crm.kinds_of(self.area)
        found = {a.id: a for a in self.crm.list_activities(ActivityFilter(kinds=kinds, involving=self.account.name))
                 if self._holds_by_rule(a)}
        if self._takes_ownerless():  # the only calendar: it takes activities without owner
            found |= {a.id: a for a in self.crm.list_activities(ActivityFilter(kinds=kinds, owners=(None,)))}
        for activity_id, (included, _) in self._memberships.items():
            activity = found.get(activity_id) or (self.crm.get_activity(activity_id) if included else None)
            if activity is None or self._membership_of(activity) is None:
                continue
            if included:
                found[activity_id] = activity
            else:
                found.pop(activity_id, None)
        return found

    def _syncs_area(self, name: str | None) -> bool:
        account = self.config.accounts.get(name) if name else None
        return account is not None and self.area in account.areas

    def _takes_ownerless(self) -> bool:
        with_area = [a for a in self.config.accounts.values() if self.area in a.areas]
        return len(with_area) == 1 and with_area[0].name == self.account.name

    def _holds_by_rule(self, activity, participating: bool = True) -> bool:
        """Does this account hold the activity (its kind aside, memberships aside)? Not
        `participating`: would it hold it anyway, as owner or delegate?"""
        me = self.account.name
        if activity.owner is None:
            return self._takes_ownerless()
        participant = participating and me in activity.participants
        if self.area == "events":
            return me == activity.owner or participant
        # A delegate that has no task list here counts as none: the task stays with the owner.
        delegate = activity.delegated_to if self._syncs_area(activity.delegated_to) else None
        return me == delegate or (me == activity.owner and delegate is None) or (participant and me != activity.owner)

    def _holds(self, activity) -> bool:
        """Does this account hold a linked activity? Pushed and taken out by hand first."""
        membership = self._membership_of(activity)
        return membership if membership is not None else self._holds_by_rule(activity)

    def _membership_of(self, activity) -> bool | None:
        """True or False when the activity was pushed into or taken out of this area by hand;
        None when not, or when that was done to an activity that held this id before."""
        included, identity = self._memberships.get(activity.id, (None, None))
        if identity is not None and activity.identity not in (None, identity):
            return None
        return included

    def _pairs(self, links, fetched, parsed, deleted) -> tuple[list[_Pair], list[CalendarLink]]:
        """The pairs to decide on, and the links that lack their activity's identity."""
        activities = self._crm_activities()
        linked_ids = set()
        pairs = []
        identities = []
        for link in links:
            activity = activities.get(link.activity_id) or self.crm.get_activity(link.activity_id)
            if activity is not None and not self._same_activity(link, activity):
                activity = None  # the id now names another activity: the linked one is gone
            if activity is not None:
                linked_ids.add(activity.id)
                if link.identity is None and activity.identity is not None:
                    identities.append(replace(link, identity=activity.identity))
            # A linked activity outside the area's kinds stays while the account holds it
            # (pushed, or its kind was edited); one it no longer holds is released.
            release = activity is not None and activity.id not in activities and not self._holds(activity)
            gone = link.href in deleted
            pairs.append(_Pair(link, activity, fetched.get(link.href) if link.href in parsed else None,
                               parsed.get(link.href), gone_on_server=gone, release=release))
        linked_hrefs = {l.href for l in links}
        # Unlinked on both sides: match an item to its activity before creating anything
        # (a lost state database, or a run that died between a create and saving its link).
        by_uid: dict[str, Activity] = {}
        for activity in activities.values():
            if activity.id in linked_ids:
                continue
            for uid in self._uids_of(activity):
                by_uid[uid] = activity
        unlinked_items = [(h, d) for h, d in parsed.items() if h not in linked_hrefs and h not in self.skip_hrefs]
        copies = self._copies([d.uid for _, d in unlinked_items])
        matched_ids: set[int] = set()
        for href, data in unlinked_items:
            activity = by_uid.get(data.uid) or self._claimed(data, activities, linked_ids)
            if activity is None:
                activity = copies(data.uid)
            if activity is not None and (activity.id in matched_ids or activity.id in linked_ids):
                # One link per activity and collection: a second copy here stays as it is.
                log.info("%s, item %s: a second copy of activity %s here; left alone", self.where, href, activity.id)
                continue
            joining = activity is not None and activity.id not in activities
            if joining and data.private and self.config.sync.private != "import":
                # A copy its holder made private stays out: joining would write the link into it,
                # and a busy block would blank the others' meeting.
                log.info("%s, item %s: a private copy of activity %s; left alone", self.where, href, activity.id)
                continue
            if activity is not None:
                matched_ids.add(activity.id)
                pairs.append(_Pair(None, activity, fetched[href], data, joining=joining,
                                   join_base=self._base_elsewhere(activity)))
                continue
            if (why := self._left_out(data, self._today)) is not None:
                log.info("%s, item %s: not imported (%s)", self.where, href, why)
                if why == "future":
                    day = self._relist_day(data)
                    self._relist = day if self._relist is None else min(self._relist, day)
                continue  # a new item that stays out of the CRM: no pair, nothing written into it
            if self._lacks_mandatory(href, data):
                continue  # held: no pair, nothing written into it; read again next run
            pairs.append(_Pair(None, None, fetched[href], data))
        for activity in activities.values():
            if activity.id not in linked_ids and activity.id not in matched_ids:
                pairs.append(_Pair(None, activity, None, None))
        return pairs, identities

    def _lacks_mandatory(self, href: str, data: ItemData) -> bool:
        """Whether a new item lacks a mandatory field ([crm] mandatory); if so it is held."""
        mandatory = self.config.crm.mandatory
        if not mandatory:
            return False
        from .mandatory import check_item, item_addresses

        addresses = item_addresses(data.people)
        employees = {a for account in self.config.accounts.values() for a in account.addresses}
        match, missing = check_item(mandatory, data.fields, addresses, employees, self.crm.find_contact_by_email,
                                    self.crm.find_partner_by_domain)
        self._matches[data.uid] = match
        if missing:
            log.info("%s, item %s: not imported, lacks %s", self.where, href, ", ".join(missing))
            self._held.append(CalendarItemRecord(
                account=self.account.name, area=self.area, href=href, outcome=HELD, uid=data.uid,
                subject=data.fields.get("subject"), missing=missing,
                addresses=[a for a in addresses if a not in employees]))
        return bool(missing)

    def _item_uid(self, activity) -> str | None:
        """The UID of the calendar item an activity came from: its key `cal:<UID>`, or from
        before teams `cal:<account>:<UID>`."""
        key = activity.key or ""
        if not key.startswith("cal:"):
            return None
        rest = key[len("cal:"):]
        account, sep, uid = rest.partition(":")
        return uid if sep and account in self.config.accounts else rest

    def _uid_for(self, activity) -> str:
        """The UID of a new item for this activity: the UID of the item it came from (every copy
        of one meeting has one UID), else derived from what is never reused (the same activity,
        the same UID, so a create repeated after a crash meets its own item)."""
        if (uid := self._item_uid(activity)) is not None:
            return uid
        if activity.uuid:
            return uid_for_key(f"activity:{activity.uuid}")
        return uid_for_key(activity.key or f"crm:{activity.id}")  # a backend without uuids

    def _uids_of(self, activity) -> set[str]:
        """Every UID gwsync gives, or gave, an item of this activity: from its uuid, from its key
        (items made before uuids), the item's own UID for an activity that came from this
        account's collection; from the bare id only for a backend that has nothing else."""
        uids = {self._uid_for(activity)}
        if activity.uuid:
            uids.add(uid_for_key(f"activity:{activity.uuid}"))
        if activity.key:
            uids.add(uid_for_key(activity.key))
        return uids

    def _same_activity(self, link: CalendarLink, activity) -> bool:
        """Is this the activity the link was made for, not another one that got its id?"""
        if link.identity is not None and activity.identity is not None:
            return link.identity == activity.identity
        # A link saved before identities were recorded: gwsync derives the UID from the
        # activity (or the activity's key from the UID), so the UID tells.
        return link.uid in self._uids_of(activity)

    def _claimed(self, data: ItemData, activities: dict, linked_ids: set):
        """The activity an unlinked item names in X-GWSYNC-ACTIVITY-ID, only when the item is
        this store's and carries that activity's uuid: an id alone may name another activity
        (a restored or replaced CRM)."""
        if data.activity_id is None or self.store is None or data.store != self.store:
            return None
        activity = activities.get(data.activity_id) or self._joinable(self.crm.get_activity(data.activity_id))
        if activity is None or activity.id in linked_ids or activity.uuid != data.activity_uuid:
            return None
        return activity

    def _joinable(self, activity):
        """An activity a copy found here may join: not one taken out of this area by hand."""
        return activity if activity is not None and self._membership_of(activity) is not False else None

    def _copies(self, uids: list[str]):
        """A lookup UID -> the activity other accounts' copies of that UID are linked to, or
        that has its key (`cal:<UID>`, or `cal:<account>:<UID>` of any account)."""
        if not uids:
            return lambda uid: None
        me = self.account.name
        by_link: dict[str, list[CalendarLink]] = {}
        for link in self.state.links_by_uid(self.area, uids):
            if link.account != me:
                by_link.setdefault(link.uid, []).append(link)
        candidates = {uid: [calendar_key(uid)] + [legacy_calendar_key(name, uid) for name in self.config.accounts]
                      for uid in uids}
        keyed = self.crm.existing_keys([key for keys in candidates.values() for key in keys])

        def lookup(uid: str):
            for link in by_link.get(uid, []):
                activity = self.crm.get_activity(link.activity_id)
                if activity is not None and self._same_activity(link, activity):
                    return self._joinable(activity)
            for key in candidates[uid]:
                if key in keyed:
                    return self._joinable(self.crm.get_activity(keyed[key]))
            return None

        return lookup

    def _base_elsewhere(self, activity) -> dict | None:
        """The last synced state of another account's copy of the activity in this area, if any."""
        for link in self.state.links_of_activity(activity.id, activity.identity):
            if link.account != self.account.name and link.area == self.area and link.base is not None:
                return dict(link.base)
        return None

    def _others_hold(self, activity) -> bool:
        """Does another account's copy, or another employee, hold the activity?"""
        if set(activity.employees) - {self.account.name}:
            return True
        return any(link.account != self.account.name
                   for link in self.state.links_of_activity(activity.id, activity.identity))

    def _shared_copy(self, link: CalendarLink, activity) -> bool:
        """Is the linked item also another account's copy (a team calendar both sync)?"""
        host = urlsplit(self.coll.url).netloc
        for other in self.state.links_of_activity(activity.id, activity.identity):
            account = self.config.accounts.get(other.account)
            if (other.account != self.account.name and other.area == self.area and other.href == link.href
                    and account is not None and account.caldav is not None
                    and urlsplit(account.caldav.url).netloc == host):
                return True
        return False

    # -- deciding ----------------------------------------------------------------------------

    def _decide(self, pair: _Pair) -> Decision:
        base = pair.link.base if pair.link else pair.join_base
        crm = Side(pair.activity.calendar_fields(), pair.activity.updated_at) if pair.activity else None
        if pair.data is not None:
            groupware = Side(pair.data.fields, pair.data.modified)
        elif pair.link is not None and not pair.gone_on_server:
            groupware = Side(dict(pair.link.base or {}))  # unchanged ETag: as last synced
        else:
            groupware = None
        return reconcile(base, crm, groupware, FIELDS, self.config.sync.conflict)

    def _action_for(self, pair: _Pair) -> Action | None:
        """The pair's action; None when there is nothing to do (not even a link to record)."""
        decision = self._decide(pair)
        if pair.release:
            return Release(pair, decision)
        if decision.forget:
            return Forget(pair, decision)
        if pair.link is not None and pair.activity is not None and pair.gone_on_server:
            return self._server_deletion(pair, decision)
        if pair.link is None and (pair.joining or decision.delete_crm) and pair.item is None:
            return None  # an unlinked copy that went before it was linked: nothing of it to keep
        if decision.delete_groupware:
            return DeleteOnServer(pair, decision)
        if decision.create_crm is not None:
            return CreateInCRM(pair, decision)
        if decision.create_groupware is not None:
            return CreateOnServer(pair, decision)
        if pair.activity is None:
            return None  # nothing on either side (an item that went before it could be read again)
        if decision.is_noop and pair.item is None and pair.link is not None and decision.base == pair.link.base:
            return None  # unchanged on both sides, item not read: its link stays as it is
        if pair.joining:
            return Join(pair, decision)
        return _update_action(decision)(pair, decision)

    def _server_deletion(self, pair: _Pair, decision: Decision) -> Action:
        """A linked item gone from the server (module doc, "A team"): delete the activity, or
        cancel it, or unlink the copy."""
        activity, link = pair.activity, pair.link
        assert activity is not None and link is not None  # linked, still in the CRM
        others = self._others_hold(activity)
        if (activity.key or "").startswith("cal:") and not others:
            # As before teams: deleted with its item, unless edited in the CRM since (then it comes back).
            return DeleteInCRM(pair, decision) if decision.delete_crm else CreateOnServer(pair, decision)
        if others and self.cancelled and link.organizer is not None and link.organizer in self.account.addresses:
            return Cancel(pair, decision)
        return Unlink(pair, decision)

    def _guard_ok(self, plan: Plan) -> bool:
        """Items gone from the server (deleted activities, unlinked copies) and items to delete
        there (released copies too) are counted against the links: a server that lost its items,
        or a CRM that lost its activities, must not empty the other side."""
        total = plan.linked

        def deletes_on_server(action: Action) -> bool:
            released = isinstance(action, Release) and not action.pair.gone_on_server
            return released or isinstance(action, DeleteOnServer)

        for side, counts in (("CRM", lambda a: isinstance(a, (DeleteInCRM, Unlink))), ("groupware", deletes_on_server)):
            count = sum(1 for action in plan.actions if counts(action))
            if guard_deletions(count, total, self.config.sync.max_delete_share) and not self.force:
                self.result.errors.append(
                    f"{self.where}: this sync would delete {count} of {total} items on the {side} side, which "
                    "looks like a server or data error; nothing was changed. If the deletions are right, "
                    "run `gwsync sync --force`")
                return False
        return True

    # -- doing -------------------------------------------------------------------------------

    def _link_for(self, activity) -> Link:
        return Link(self.config.crm.link.format(id=activity.id), activity.id, self.store, activity.uuid)

    def _run_action(self, action: Action, attempt: int = 0) -> None:
        if self.dry_run:
            self._count(action)
            return
        try:
            action.run(self)
        except PreconditionFailed as exc:
            if attempt >= MAX_RETRIES:
                raise DavError("the item kept changing on the server; it will be synced next time") from exc
            again = self._action_for(self._reread(action.pair))  # that pair only, as it is now
            if again is not None:
                self._run_action(again, attempt + 1)

    def _count(self, action: Action) -> None:
        counts, decision = self.result.counts, action.decision
        if isinstance(action, Release):
            counts["updated_crm"] += bool(decision.update_crm) and decision.create_crm is None
            counts["deleted_groupware"] += not action.pair.gone_on_server
            return
        if isinstance(action, Unlink):
            counts["unlinked"] += 1
            counts["updated_crm"] += isinstance(action, Cancel)
            return
        counts["deleted_crm"] += decision.delete_crm
        counts["deleted_groupware"] += decision.delete_groupware
        counts["created_crm"] += decision.create_crm is not None
        counts["created_groupware"] += decision.create_groupware is not None
        counts["updated_crm"] += bool(decision.update_crm) and decision.create_crm is None
        counts["updated_groupware"] += bool(decision.update_groupware) and decision.create_groupware is None
        counts["conflicts"] += bool(decision.conflicts)

    def _reread(self, pair: _Pair) -> _Pair:
        """After a 412: the item as it is on the server now."""
        href = pair.link.href if pair.link else (pair.item.href if pair.item else None)
        item = self.coll.get(href) if href else None
        if item is None:  # an unlinked copy that went has no base to keep
            return replace(pair, item=None, data=None, gone_on_server=True,
                           join_base=pair.join_base if pair.link else None)
        return replace(pair, item=item, data=self._read(item, linked=pair.link is not None), gone_on_server=False)

    def _draft(self, data: ItemData, fields: dict) -> ActivityDraft:
        people = self._attendees(fields.get("attendees"), data, [])
        # What made a mandatory contact or partner goes with it (the same rule; it also counts
        # the attendees of a busy block, which the activity does not get).
        found: People | SenderMatch = people
        match = self._matches.get(data.uid)
        if match is not None and people.contact_id is None and (match.contact_id or people.partner_id is None):
            found = match
        return ActivityDraft(
            key=calendar_key(data.uid), kind=fields["kind"], status=fields["status"],
            subject=fields["subject"], body=fields["body"], location=fields["location"], start=fields["start"],
            end=fields["end"], due=fields["due"], rrule=fields["rrule"], owner=self.account.name,
            attendees=people.attendees, contact_id=found.contact_id, partner_id=found.partner_id,
            participants=list(dict.fromkeys([self.account.name, *people.employees])),
            # The private mark comes from CLASS (with "skip", private items are never imported).
            private=data.private)

    def _someone_elses(self, activity) -> bool:
        """Did another account's sync make (or join) this activity? Then a copy here joins it."""
        return activity.owner != self.account.name or any(
            link.account != self.account.name for link in self.state.links_of_activity(activity.id, activity.identity))

    # -- attendees ---------------------------------------------------------------------------

    def _attendees(self, value: str | None, data: ItemData | None, current: list[Attendee]) -> People:
        """The activity's attendees for the merged field "attendees" (addresses but the
        organizer's), resolved (gwsync.people): an entry the CRM has stays, a new one comes with
        the item's name; the organizer is the item's, else the CRM's. No attendees, no organizer."""
        wanted = value.split(",") if value else []
        item = {p.email: p for p in data.people} if data is not None and wanted else {}
        organizer = next((p for p in item.values() if p.organizer), None) or \
            next((a for a in current if a.organizer and wanted), None)
        known = {a.email: a for a in current if not a.organizer}
        order = [*known, *item, *wanted]
        listed = [replace(known.get(e) or item.get(e) or Attendee(e), organizer=False)
                  for e in dict.fromkeys(order) if e in wanted and (organizer is None or e != organizer.email)]
        return resolve_attendees(([organizer] if organizer else []) + listed, self._employees,
                                 self.crm.find_contact_by_email, self.crm.find_partner_by_domain)

    def _update_crm(self, activity, changes: dict, data: ItemData | None) -> None:
        """The merged changes into the CRM. Changed attendees are resolved: they give a contact
        and partner the activity lacks, and employees among them become participants (none is
        removed: that would release their copies)."""
        changes = dict(changes)
        people = None
        if "attendees" in changes:
            people = self._attendees(changes["attendees"], data, activity.attendees)
            changes["attendees"] = people.attendees
            if activity.contact_id is None and people.contact_id is not None:
                changes["contact_id"] = people.contact_id
            if activity.partner_id is None and people.partner_id is not None and \
                    changes.get("contact_id", activity.contact_id) in (None, people.contact_id):
                changes["partner_id"] = people.partner_id
        # Participants first: a run that dies in between finds the attendees not yet merged and
        # does both again (after the update, the next run would see no change to take them from).
        for name in people.employees if people is not None else []:
            self.crm.add_participant(activity.id, name)
        self.crm.update_activity(activity.id, changes)

    def _organizer(self, activity) -> Attendee | None:
        """The ORGANIZER gwsync writes into an item that has none (gwsync.people.organizer_of)."""
        return organizer_of(activity.attendees, self.config.accounts.get(activity.owner or self.account.name))

    def _create_crm_activities(self, actions) -> None:
        """All activities this run creates, in one CRM transaction (idempotent by UID key)."""
        drafts = [self._draft(a.pair.data, a.decision.create_crm) for a in actions
                  if isinstance(a, CreateInCRM) and a.pair.data is not None and a.decision.create_crm is not None]
        if drafts:
            existing = self.crm.existing_keys([d.key for d in drafts])
            ids = self.crm.create_activities(drafts)
            for draft, activity_id in zip(drafts, ids, strict=True):
                activity = self.crm.get_activity(activity_id)
                if draft.key in existing and activity is not None and not self._someone_elses(activity):
                    # created by a run that died before linking: bring it up to date
                    self.crm.update_activity(activity_id, {k: getattr(draft, k) for k in FIELDS})
                    activity = self.crm.get_activity(activity_id)
                self._created[draft.key] = activity

    def _create_in_crm(self, pair: _Pair, decision: Decision) -> None:
        data, item = pair.data, pair.item
        fields = decision.create_crm
        assert data is not None and item is not None and fields is not None  # a new item, read this run
        key = calendar_key(data.uid)
        activity = self._created.get(key)
        if activity is None:  # decided again after a 412: create it now
            activity = self.crm.get_activity(self.crm.create_activities([self._draft(data, fields)])[0])
        if pair.link is None and self._someone_elses(activity):
            # Another account imported the same UID meanwhile (planned before it did): join it.
            joined = replace(pair, activity=activity, joining=True, join_base=self._base_elsewhere(activity))
            self._join(joined, self._decide(joined))
            return
        self.result.counts["created_crm"] += 1
        etag = self._write_link(item, data, fields, activity)
        self._save(activity, data.uid, item.href, etag, fields, data.organizer)

    def _join(self, pair: _Pair, decision: Decision) -> None:
        """Link a copy of an activity held elsewhere; its account becomes a participant."""
        assert pair.activity is not None  # matched to an activity
        self.crm.add_participant(pair.activity.id, self.account.name)  # atomic: other accounts may join at once
        self._update(pair, decision)

    def _unlink(self, pair: _Pair) -> None:
        """The copy went from the server; the activity stays. The account leaves the participants,
        or, when it holds the activity anyway (owner, delegate, pushed), it is taken out."""
        activity, link = pair.activity, pair.link
        assert activity is not None and link is not None  # a linked copy of an existing activity
        me = self.account.name
        if (self._membership_of(activity) is None and me in activity.participants
                and not self._holds_by_rule(activity, participating=False)):
            self.crm.remove_participant(activity.id, me)
        else:
            self.state.set_membership(me, self.area, activity.id, False, activity.identity)
        self._drop(link)
        self.result.counts["unlinked"] += 1

    def _cancel(self, pair: _Pair) -> None:
        assert pair.activity is not None  # a linked copy of an existing activity
        self.crm.update_activity(pair.activity.id, {"status": self.cancelled})
        self.result.counts["updated_crm"] += 1
        self._unlink(pair)

    def _release(self, pair: _Pair, decision: Decision) -> None:
        """A copy this account no longer holds: the edits made in it since the last sync go to
        the activity, then it is deleted on the server (If-Match) and unlinked; the activity stays.
        A team calendar's item that another account still holds only loses this account's link."""
        activity, link, item = pair.activity, pair.link, pair.item
        assert activity is not None and link is not None  # linked, still in the CRM
        if pair.data is not None and decision.update_crm and decision.create_crm is None:
            self._update_crm(activity, decision.update_crm, pair.data)
            self.result.counts["updated_crm"] += 1
        if not pair.gone_on_server and not self._shared_copy(link, activity):
            self.coll.delete(link.href, (item.etag if item is not None else link.etag) or "*")
            self.result.counts["deleted_groupware"] += 1
        self._drop(link)

    def _write_link(self, item: Item, data: ItemData, fields: dict, activity) -> str | None:
        """Write the CRM link into the item (not a change on either side), and kind and status
        where the item's X-GWSYNC properties say otherwise (another store's). On a 412 keep the
        old ETag: the next sync reads the item again."""
        link = self._link_for(activity)
        stale = data.stale_recorded(fields)
        if (data.has_link(link) and not stale) or self._busy(data):
            return item.etag  # a busy block: writing the link would replace its description
        text = update_item(item.data or "", fields, stale, self.done, link, include_link=True,
                           cancelled_status=self.cancelled)
        try:
            return self.coll.update(item.href, text, item.etag or "*")
        except PreconditionFailed:
            return item.etag

    def _create_on_server(self, pair: _Pair, decision: Decision) -> None:
        activity = pair.activity
        fields = decision.create_groupware
        assert activity is not None and fields is not None  # an activity that has no item yet
        uid = self._uid_for(activity)
        href = self.coll.href_for(uid)
        text = new_item(uid, self.component, fields, self.done, self._link_for(activity),
                        alarm=activity.kind == "WIEDERVORLAGE", people=activity.attendees,
                        organizer=self._organizer(activity), cancelled_status=self.cancelled)
        self._before_creating()
        try:
            etag = self.coll.create(href, text)
        except PreconditionFailed as exc:
            existing = self.coll.get(href)
            if existing is None:
                raise
            data = self._read(existing, linked=False)
            if data.uid != uid or not self._may_adopt(data, activity):
                raise DavError(f"{href} exists on the server and belongs to another item") from exc
            # Our own item from a run that died before saving the link: adopt it, then merge.
            self._save(activity, uid, href, existing.etag, data.fields, data.organizer)
            adopted = _Pair(CalendarLink(self.account.name, self.area, activity.id, uid, href, existing.etag,
                                         data.fields, activity.identity), activity, existing, data)
            self._update(adopted, self._decide(adopted))
            return
        self.result.counts["created_groupware"] += 1
        if pair.link is not None and pair.link.href != href:
            self._drop(pair.link)
        self._save(activity, uid, href, etag, fields)

    def _may_adopt(self, data: ItemData, activity) -> bool:
        """An item found under this activity's UID is its own unless it names another store or
        another activity (an item left by a deleted activity with the same key)."""
        if data.store is not None and data.store != self.store:
            return False
        return data.activity_uuid is None or data.activity_uuid == activity.uuid

    def _update(self, pair: _Pair, decision: Decision) -> None:
        activity, saved, base = pair.activity, pair.link, decision.base
        assert activity is not None and base is not None  # an update: both sides are there, merged
        if saved is None:  # matched without a link (lost state, or adopting): link it now
            data, found = pair.data, pair.item
            assert data is not None and found is not None  # unlinked: the item was read this run
            self._save(activity, data.uid, found.href, found.etag, data.fields, data.organizer)
            saved = CalendarLink(self.account.name, self.area, activity.id, data.uid, found.href, found.etag,
                                 data.fields, activity.identity, data.organizer)
            pair = _Pair(saved, activity, found, data)
        if decision.conflicts:
            self.result.counts["conflicts"] += 1
            self.result.conflicts.append(
                f"{self.where}, activity {activity.id} {activity.subject!r}: {', '.join(decision.conflicts)} "
                f"changed on both sides; kept the {self._winner(decision, pair)} value "
                f"(policy {self.config.sync.conflict})")
        if decision.update_crm:
            self._update_crm(activity, decision.update_crm, pair.data)
            self.result.counts["updated_crm"] += 1
        etag = saved.etag
        link = self._link_for(activity)
        item = pair.item
        needs_link = item is not None and not (pair.data.has_link(link) or self._busy(pair.data)
                                               if pair.data is not None
                                               else link_is_current(item.data or "", link))
        stale = pair.data.stale_recorded(base) if needs_link and pair.data and base else set()
        if decision.update_groupware or needs_link:
            if item is None:
                item = self.coll.get(saved.href)
                if item is None:
                    raise PreconditionFailed(saved.href)
                if item.etag != saved.etag:
                    raise PreconditionFailed(saved.href)  # changed since the listing: decide again
            text = update_item(item.data or "", base, set(decision.update_groupware) | stale, self.done,
                               link, include_link=needs_link or "body" in decision.update_groupware,
                               people=activity.attendees, organizer=self._organizer(activity),
                               cancelled_status=self.cancelled)
            etag = self.coll.update(item.href, text, item.etag or "*")
            if decision.update_groupware:
                self.result.counts["updated_groupware"] += 1
        elif item is not None:
            etag = item.etag
        organizer = pair.data.organizer if pair.data is not None else saved.organizer
        self._save(activity, saved.uid, saved.href, etag, base, organizer)

    def _winner(self, decision: Decision, pair: _Pair) -> str:
        field_name = decision.conflicts[0]
        assert decision.base is not None and pair.activity is not None  # a conflict: both sides merged
        return "CRM" if decision.base.get(field_name) == pair.activity.calendar_fields().get(field_name) else \
            "groupware"

    def _save(self, activity, uid: str, href: str, etag: str | None, base: dict,
              organizer: str | None = None) -> None:
        self._link_changes.append(("save", CalendarLink(self.account.name, self.area, activity.id, uid, href, etag,
                                                        dict(base), activity.identity, organizer)))

    def _describe(self, pair: _Pair) -> str:
        if pair.activity is not None:
            return f"activity {pair.activity.id} {pair.activity.subject!r}"
        if pair.link is not None:
            return f"item {pair.link.href}"
        return f"item {pair.item.href if pair.item else '?'}"
