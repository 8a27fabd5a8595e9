"""Import folder names: `CRM <description> [<status>]` (pure functions, no IMAP)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The description may contain anything but must not be empty; the status key is the text in
# the final pair of brackets. Spaces around the key are tolerated ("[ E ]"), nested brackets not.
_PATTERN = re.compile(r"^CRM\s+(?P<description>\S.*?)\s*\[\s*(?P<status>[^\[\]\s]+)\s*\]\s*$", re.DOTALL)


@dataclass(frozen=True)
class ImportFolderName:
    description: str
    status: str


def parse_import_folder(element: str) -> ImportFolderName | None:
    """Parse the last element of a folder name; None when it is not an import folder.

    >>> parse_import_folder("CRM Erledigt [E]")
    ImportFolderName(description='Erledigt', status='E')
    >>> parse_import_folder("CRM Archiv") is None
    True
    """
    match = _PATTERN.match(element)
    if not match:
        return None
    description = match.group("description").strip()
    if not description or description.startswith("["):
        return None
    return ImportFolderName(description=description, status=match.group("status"))


def last_element(name: str, delimiter: str | None) -> str:
    """The last hierarchy element of a full folder name."""
    if not delimiter:
        return name
    return name.rsplit(delimiter, 1)[-1]


def is_below(name: str, root: str, delimiter: str | None) -> bool:
    """True when `name` lies strictly below `root` (at any depth). INBOX is case-insensitive."""
    if not delimiter:
        return False
    if root == "":
        return True
    if root.upper() == "INBOX":
        return name.upper().startswith("INBOX" + delimiter) and len(name) > len(root) + 1
    return name.startswith(root + delimiter) and len(name) > len(root) + 1
