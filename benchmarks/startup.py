"""Start-up time of the `gwsync` command: a new interpreter per run, as a user types it.

Prints the best and the median wall time of `gwsync --version`, `gwsync --help` and `gwsync
status` (a command that opens the stores) over N runs, and which database stacks each loaded
(SQLAlchemy, psycopg, Procrastinate): the first two need none.

    python benchmarks/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _setup import ROOT, write_config

STACKS = ("sqlalchemy", "psycopg", "procrastinate", "sqlite_utils")


def run(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gwsync.cli", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def stacks_loaded(args: list[str], env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "gwsync.cli", *args], env=env, check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return [s for s in STACKS if s in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               "GWSYNC_CONFIG": str(config)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled once, then read from __pycache__
        run(["status"], env)  # makes the stores once: the runs below time opening them, not creating them
        for args in (["--version"], ["--help"], ["status"]):
            times = [run(args, env) for _ in range(runs)]
            print(f"gwsync {' '.join(args):10} best {min(times):.3f} s, median {statistics.median(times):.3f} s"
                  f" ({runs} runs); loads: {', '.join(stacks_loaded(args, env)) or 'no database stack'}")


if __name__ == "__main__":
    main()
