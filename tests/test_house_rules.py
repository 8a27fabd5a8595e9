"""Rules of the house that a test keeps: every command has help, front-ends use only the
Engine's public methods, and every adapter error speaks the one error vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest

from gwsync import accountlock, config, engine, errors
from gwsync.calendar import dav
from gwsync.cli import main
from gwsync.cli import watcher as watch  # the module; gwsync.cli.watch is the command
from gwsync.mail import imap, sieve

PACKAGE = Path(engine.__file__).resolve().parent
FRONT_ENDS = ["cli/__init__.py", "cli/reviewer.py", "cli/watcher.py", "web/app.py", "demo/__init__.py"]
STORES = {"state", "crm"}


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield path + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))


@pytest.mark.parametrize("path, command", list(_commands(main)), ids=lambda v: " ".join(v) if isinstance(v, tuple)
                         else "")
def test_every_command_has_help(path, command):
    assert (command.help or "").strip(), f"gwsync {' '.join(path)} has no help text"
    assert command.get_short_help_str().strip(), f"gwsync {' '.join(path)} has no short help for the list"


def test_every_command_is_checked():
    names = {" ".join(path) for path, _ in _commands(main)}
    assert {"sync", "review", "rules list", "activity add", "unlock", "serve"} <= names


def _store_accesses(tree: ast.AST) -> list[tuple[int, str]]:
    """`<engine>.state` / `<engine>.crm`, where <engine> is a name or attribute called engine or
    eng, or a call of engine(): front-ends must go through the Engine's methods instead."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in STORES):
            continue
        base = node.value
        if isinstance(base, ast.Call):
            base = base.func
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        if name in ("engine", "eng", "_engine"):
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("module", FRONT_ENDS)
def test_front_ends_never_touch_the_engines_stores(module):
    tree = ast.parse((PACKAGE / module).read_text(), module)
    assert _store_accesses(tree) == []


def test_the_store_access_check_finds_what_it_must():
    sample = "engine.state.runs()\ncrm = eng.crm\nengine().state.not_imported()\nself.engine.crm.get(1)\n" \
             "obj.config.crm.statuses\nconfig.state_database\n"
    assert sorted(line for line, _ in _store_accesses(ast.parse(sample))) == [1, 2, 3, 4]


@pytest.mark.parametrize("error, code, transient", [
    (imap.LoginFailed, 3, False), (dav.DavLoginFailed, 3, False), (sieve.SieveLoginRefused, 3, False),
    (engine.CredentialLocked, 3, False), (config.ConfigError, 2, False), (errors.UsageError, 2, False),
    (imap.ServerUnreachable, 1, True), (dav.DavUnreachable, 1, True), (sieve.SieveUnreachable, 1, True),
    (imap.MailServerError, 1, False), (imap.MailGone, 1, False), (dav.DavError, 1, False),
    (dav.PreconditionFailed, 1, False), (dav.SyncTokenInvalid, 1, False), (sieve.SieveError, 1, False),
    (accountlock.AccountBusy, 1, True), (watch.AlreadyRunning, 1, True), (errors.NotFound, 1, False),
])
def test_every_adapter_error_is_a_gwsync_error_with_its_exit_code(error, code, transient):
    exc = error("account alice: something")
    assert isinstance(exc, errors.GwsyncError)
    assert (exc.exit_code, exc.transient) == (code, transient)
    named = exc.reworded("account bob: something")
    assert type(named) is error and str(named) == "account bob: something" and named.exit_code == code


def test_the_old_catch_clauses_still_catch():
    # code written against the old classes (a host CRM's scripts) keeps working
    assert issubclass(imap.LoginFailed, imap.MailServerError) and issubclass(dav.DavLoginFailed, dav.DavError)
    assert issubclass(errors.NotFound, LookupError) and issubclass(errors.UsageError, ValueError)
    assert engine.CredentialLocked is errors.CredentialLocked and config.ConfigError is errors.ConfigError
