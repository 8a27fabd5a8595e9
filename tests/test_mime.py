"""MIME parsing, file name sanitising and streamed decoding (pure, no server)."""

import base64
import binascii
import quopri
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from gwsync.mime import StreamDecoder, content_key, html_to_text, parse_message, sanitise_filename

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mail"


def fixture(name: str):
    return parse_message((FIXTURES / name).read_bytes())


def test_rfc2047_subject_and_unknown_charsets():
    mail = fixture("unknown-charset.eml")
    assert mail.subject == "Übersechung für Köln"
    assert mail.sender == "bjoern@example.org"
    assert mail.sender_name == "Björn"  # encoded word in an unknown charset, read as cp1252
    assert "Grüße aus Köln" in mail.body
    assert mail.date is None
    assert any("x-mac-klingon" in w for w in mail.warnings)


def test_malformed_headers_degrade_to_readable_values():
    mail = fixture("malformed-headers.eml")
    assert mail.subject == "Malformed headers müssen still import"
    assert mail.sender == "broken@example.org"
    assert mail.recipients == ["a@example.com"]
    assert mail.message_id is None


def test_nested_multipart_body_and_attachments():
    mail = fixture("nested-multipart.eml")
    assert mail.body == "Plain body of the nested mail."
    names = {a.filename: a for a in mail.attachments}
    assert set(names) == {"logo.png", "Forwarded inner mail.eml", "Prüfbericht § 3.txt"}
    assert names["Prüfbericht § 3.txt"].data == "Prüfbericht".encode()
    assert names["Forwarded inner mail.eml"].content_type == "message/rfc822"
    assert b"Inner body." in names["Forwarded inner mail.eml"].data


def test_html_only_mail_falls_back_to_text_without_script_or_style():
    mail = fixture("html-only.eml")
    assert mail.body == "First paragraph & more.\n\nSecond line"


def test_no_message_id():
    assert fixture("no-message-id.eml").message_id is None


def test_date_is_normalised_to_utc():
    mail = parse_message(b"Date: Tue, 24 Nov 2026 09:12:00 +0100\r\nSubject: x\r\n\r\nb")
    assert mail.date == "2026-11-24T08:12:00+00:00"


def test_identical_bytes_same_key_any_difference_other_key():
    raw = (FIXTURES / "no-message-id.eml").read_bytes()
    assert content_key(raw) == content_key(bytes(raw))
    assert content_key(raw) != content_key(raw + b" ")


@pytest.mark.parametrize("name, expected", [
    ("../../x", "x"),
    ("/etc/passwd", "passwd"),
    ("..\\..\\windows\\evil.bat", "evil.bat"),
    ("nul\x00inside.txt", "nul_inside.txt"),
    ("...", "attachment.txt"),
    ("", "attachment.txt"),
    (None, "attachment.txt"),
    (".bashrc", "bashrc"),
    ("Prüfbericht § 3.txt", "Prüfbericht § 3.txt"),
    ("a:b*c?.pdf", "a_b_c_.pdf"),
])
def test_sanitise_filename(name, expected):
    assert sanitise_filename(name, "text/plain") == expected


def test_long_names_keep_their_extension():
    name = sanitise_filename("ä" * 400 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= 200


@pytest.mark.parametrize("name, expected", [
    ("inv\u202efdp.exe", "invfdp.exe"),  # RIGHT-TO-LEFT OVERRIDE: shown as "invexe.pdf"
    ("\u2067photo\u2069 gpj.exe", "photo gpj.exe"),  # isolates
    ("\u202a\u202b\u202c\u202d\u200e\u200f\u061cname.pdf", "name.pdf"),  # embeddings, marks
    ("a\u200bb\u200c\u200d\u2060\ufeffc.txt", "abc.txt"),  # zero-width characters
    ("\u202e\u200b", "attachment.txt"),  # nothing visible left
    ("a\x85b\x9bc\u2028d\u2029e.txt", "a_b_c_d_e.txt"),  # C1 controls, line and paragraph separators
])
def test_invisible_format_controls_are_removed_from_names(name, expected):
    assert sanitise_filename(name, "text/plain") == expected


def test_a_bidi_override_in_a_mailed_name_is_removed():
    raw = (b"From: a@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n"
           b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--x\r\nContent-Type: application/pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename*=utf-8''inv%E2%80%AEfdp.exe\r\n"
           b"\r\nJVBERi0=\r\n--x--\r\n")
    (attachment,) = parse_message(raw).attachments
    assert attachment.filename == "invfdp.exe" and attachment.data == b"%PDF-"


_INVISIBLE = {"Cc", "Cf", "Zl", "Zp"}


@given(st.text())
def test_sanitised_names_are_always_safe(name):
    safe = sanitise_filename(name)
    assert safe and len(safe.encode("utf-8")) <= 200
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert not safe.startswith(".") and safe not in (".", "..")
    assert not [c for c in safe if unicodedata.category(c) in _INVISIBLE]


@settings(max_examples=200)
@given(st.binary(max_size=2000))
def test_parsing_never_raises_on_arbitrary_bytes(raw):
    mail = parse_message(raw)
    assert isinstance(mail.subject, str) and isinstance(mail.body, str)


@settings(max_examples=100)
@given(st.lists(st.text(max_size=30), max_size=8), st.binary(max_size=300))
def test_parsing_survives_garbage_headers(headers, body):
    raw = "".join(f"{h}\r\n" for h in headers).encode("utf-8", "surrogateescape") + b"\r\n" + body
    parse_message(raw)


def _chunked(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for p in points + [len(data)]:
        yield data[start:p]
        start = p


@given(st.binary(max_size=3000), st.lists(st.integers(0, 5000), max_size=12))
def test_streamed_base64_equals_whole_decode(data, cuts):
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    decoder = StreamDecoder("base64")
    out = b"".join(decoder.feed(chunk) for chunk in _chunked(encoded, cuts)) + decoder.finish()
    assert out == data


@given(st.binary(max_size=3000), st.lists(st.integers(0, 5000), max_size=12))
def test_streamed_quoted_printable_equals_whole_decode(data, cuts):
    encoded = quopri.encodestring(data)
    decoder = StreamDecoder("quoted-printable")
    out = b"".join(decoder.feed(chunk) for chunk in _chunked(encoded, cuts)) + decoder.finish()
    assert out == binascii.a2b_qp(encoded)


def test_html_to_text_survives_broken_markup():
    assert html_to_text("<p>a<b>b</p><script>x</script>&amp;") == "ab\n&"


def test_the_html_alternative_is_kept_beside_the_text():
    raw = (b"From: a@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"Gr\xc3\xbc\xc3\x9fe\r\n--x\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<p>Gr\xfc\xdfe</p>\r\n--x--\r\n")
    mail = parse_message(raw)
    assert mail.body == "Grüße" and mail.body_html.strip() == "<p>Grüße</p>"
    assert mail.attachments == []


def test_an_html_only_mail_keeps_its_html_and_gets_a_text_body():
    mail = fixture("html-only.eml")
    assert "<script" in mail.body_html  # kept as sent; the web view sanitises where it shows it
    assert "<script" not in mail.body
    assert parse_message(b"Subject: plain\r\n\r\ntext").body_html is None
