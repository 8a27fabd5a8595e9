"""Import folder names: `CRM <description> [<status>]`."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gwsync.mail.folders import ImportFolderName, is_below, last_element, parse_import_folder


@pytest.mark.parametrize("name, expected", [
    ("CRM Erledigt [E]", ImportFolderName("Erledigt", "E")),
    ("CRM Rückruf [R]", ImportFolderName("Rückruf", "R")),
    ("CRM Kunde Nord [O]", ImportFolderName("Kunde Nord", "O")),
    ("CRM a [b] c [WV]", ImportFolderName("a [b] c", "WV")),
    ("CRM Erledigt [ E ]", ImportFolderName("Erledigt", "E")),
    ("CRM   Viel   Platz [E]  ", ImportFolderName("Viel   Platz", "E")),
    ("CRM Punkt.mit.Punkten [E]", ImportFolderName("Punkt.mit.Punkten", "E")),
])
def test_import_folder_names(name, expected):
    assert parse_import_folder(name) == expected


@pytest.mark.parametrize("name", [
    "CRM Archiv", "CRM Erledigt", "CRM [E]", "CRMErledigt [E]", "crm Erledigt [E]", "XCRM Erledigt [E]",
    "CRM Erledigt []", "CRM Erledigt [E", "CRM Erledigt E]", "CRM Erledigt [E] x", "CRM Erledigt [[E]]",
    "INBOX", "", "CRM Erledigt [E F]",
])
def test_not_import_folders(name):
    assert parse_import_folder(name) is None


@given(description=st.text(min_size=1).filter(lambda d: d.strip() and not d.strip().startswith("[")
                                               and "\n" not in d and "\r" not in d),
       status=st.text(alphabet=st.characters(blacklist_characters="[] \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0",
                                             blacklist_categories=("Zs", "Zl", "Zp", "Cc")), min_size=1))
def test_any_description_and_status_round_trip(description, status):
    parsed = parse_import_folder(f"CRM {description} [{status}]")
    assert parsed is not None
    assert parsed.status == status
    assert parsed.description == description.strip()


def test_last_element_and_is_below():
    assert last_element("INBOX/Kunden/CRM Offen [O]", "/") == "CRM Offen [O]"
    assert last_element("INBOX.CRM Offen [O]", ".") == "CRM Offen [O]"
    assert last_element("CRM Offen [O]", None) == "CRM Offen [O]"
    assert is_below("INBOX/a/b", "INBOX", "/")
    assert is_below("inbox/a", "INBOX", "/")
    assert not is_below("INBOX", "INBOX", "/")
    assert not is_below("INBOXES/a", "INBOX", "/")
    assert is_below("Shared/a", "", "/")
    assert not is_below("Other/a", "Shared", "/")
