"""A command loads only what it uses: which modules the real `gwsync` process imports.

Each test starts the command as a user types it (a new interpreter, stdout a pipe, not a
terminal) against the real Dovecot and Radicale, with PYTHONPROFILEIMPORTTIME=1, and reads the
names of the modules it imported from stderr. Timings belong to benchmarks/calendar_sync.py;
this is about behaviour: a mail command never loads the CalDAV client, iCalendar, the web
stack, ManageSieve or rich.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gwsync
from conftest import make_mail

DONE = "INBOX/CRM Erledigt [E]"
# The checkout under test, first on the child's path (whatever its working directory).
CODE = Path(gwsync.__file__).resolve().parent.parent

# Third-party stacks, by top-level package, that only calendar, web, rules or a terminal need.
CALENDAR_STACK = {"caldav", "niquests", "urllib3", "icalendar"}
WEB_STACK = {"flask", "werkzeug", "jinja2", "flask_wtf", "waitress", "nh3"}
OTHER_STACKS = {"sievelib", "rich", "hypothesis", "pytest"}
# gwsync's own modules for those areas and front-ends.
OWN_MODULES = {"gwsync.calendar.sync", "gwsync.calendar.icalmap", "gwsync.web",
               "gwsync.mail.sieve", "gwsync.cli.reviewer", "gwsync.cli.watcher", "gwsync.demo", "gwsync.testing"}


def imported_by(args: list[str], config=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -m gwsync.cli [--config C] ARGS` (or `python -c ARGS[0]`) and return the
    process and the full names of every module it imported."""
    command = [sys.executable, "-c", args[0]] if config is None else \
        [sys.executable, "-m", "gwsync.cli", "--config", str(config), *args]
    path = os.pathsep.join(p for p in (str(CODE), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=CODE,
                          env={**os.environ, "PYTHONPATH": path, "PYTHONPROFILEIMPORTTIME": "1"})
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    modules.discard("imported package")  # the header line
    assert len(modules) > 20, done.stderr[-2000:]  # the profile was read: python's own start-up alone is more
    return done, modules


def not_needed(modules: set[str]) -> set[str]:
    stacks = CALENDAR_STACK | WEB_STACK | OTHER_STACKS
    return {m for m in modules if m.split(".")[0] in stacks
            or any(m == own or m.startswith(own + ".") for own in OWN_MODULES)}


@pytest.fixture
def world(make_env):
    """An account with mail, events and tasks: the config names a CalDAV server, so a mail
    command that loaded the calendar stack would have a reason to."""
    return make_env(areas=("mail", "events", "tasks"))


def test_folders_loads_no_calendar_web_or_rules_stack(world):
    world.create(DONE)
    done, modules = imported_by(["folders"], world.config_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "CRM Erledigt" in done.stdout  # the command did its work, on the real server
    assert "imapclient" in modules
    assert not_needed(modules) == set()


def test_mail_sync_imports_mail_and_loads_no_calendar_stack(world):
    world.append(DONE, make_mail(1))
    done, modules = imported_by(["sync", "--only", "mail"], world.config_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "imported 1 mail(s)" in done.stdout
    assert {"gwsync.mail.importer", "gwsync.mail.mime"} <= modules
    assert not_needed(modules) == set()


@pytest.mark.parametrize("command", [["status"], ["held"], ["activities"], ["unknown"]])
def test_commands_that_read_the_stores_load_no_server_stacks(world, command):
    done, modules = imported_by(command, world.config_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert not_needed(modules) == set()


def test_a_calendar_sync_loads_the_caldav_client(world):
    """The other side of the check: the calendar areas do load their stack, and the test sees it."""
    done, modules = imported_by(["sync", "--only", "events"], world.config_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert {"caldav", "niquests", "gwsync.calendar.sync"} <= not_needed(modules)


def test_the_package_loads_its_public_names_on_first_use():
    code = ("import sys, gwsync\n"
            "assert 'gwsync.engine' not in sys.modules and 'gwsync.crm.embedded' not in sys.modules\n"
            "from gwsync import Engine, load_config, EmbeddedCRM, CRMBackend\n"
            "import gwsync.engine, gwsync.config\n"
            "assert Engine is gwsync.engine.Engine and load_config is gwsync.config.load_config\n"
            "assert 'Engine' in dir(gwsync) and set(gwsync.__all__) <= set(dir(gwsync))\n"
            "try:\n    gwsync.NoSuchName\nexcept AttributeError:\n    print('ok')\n")
    done, modules = imported_by([code])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-1000:]
    assert not_needed(modules) == set()


DATABASE_STACK = {"sqlalchemy", "psycopg", "procrastinate", "sqlite_utils"}


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_commands_that_open_no_store_load_no_database_stack(flag):
    """`gwsync --version` and `--help` stay quick: SQLAlchemy's import alone took about 0.17 s,
    most of the start-up. The pure modules that use the state's outcomes (decisions) and the
    Engine's module load no store either; only opening one does."""
    code = ("import sys\n"
            "import gwsync.engine, gwsync.mail.decisions, gwsync.accounts\n"
            "from gwsync.cli import main\n"
            f"sys.argv = ['gwsync', {flag!r}]\n"
            "main()\n")
    done, modules = imported_by([code])
    assert done.returncode == 0, done.stderr[-1000:]
    assert "gwsync" in done.stdout  # the version line, or the help text
    assert {"gwsync.cli", "gwsync.engine", "click"} <= modules
    assert {m for m in modules if m.split(".")[0] in DATABASE_STACK} == set()


def test_a_command_that_reads_the_stores_loads_sqlalchemy(world):
    """The other side: the check above sees SQLAlchemy when a command does load it."""
    done, modules = imported_by(["status"], world.config_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert {"sqlalchemy", "gwsync.storage.state"} <= modules
