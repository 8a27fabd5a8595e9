"""MIME parsing, file name sanitising and streamed decoding (pure, no server)."""

import base64
import binascii
import hashlib
import quopri
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mimegen
from gwsync.mail.importer import MAX_STREAMED_TEXT
from gwsync.mail.mime import (
    Attachment,
    MailReader,
    StreamDecoder,
    content_key,
    decode_transfer,
    html_to_text,
    parse_header_block,
    parse_message,
    sanitise_filename,
)

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


RECIPIENTS_MAIL = (
    b"From: =?utf-8?q?M=C3=BCller=2C_Hans?= <Hans.Mueller@Acme.example>\r\n"
    b"To: \"Mustermann, Erika\" <Erika@Kunde.example>, bob@kunde.example,\r\n"
    b" =?iso-8859-1?q?J=F6rg?= <joerg@kunde.example>\r\n"
    b"To: erika@kunde.example, not-an-address\r\n"
    b"Cc: =?utf-8?b?w4RydGU=?= <aerzte@praxis.example>\r\n"
    b"Subject: Angebot\r\n\r\nHallo\r\n")


def test_to_cc_and_the_senders_display_name_are_read_and_decoded():
    mail = parse_message(RECIPIENTS_MAIL)
    assert mail.sender == "hans.mueller@acme.example"
    assert mail.sender_name == "Müller, Hans"  # the encoded comma does not split the name
    assert mail.to == ["erika@kunde.example", "bob@kunde.example", "joerg@kunde.example"]  # each once
    assert mail.cc == ["aerzte@praxis.example"]
    assert mail.recipients == mail.to + mail.cc


def test_the_streamed_path_reads_the_same_recipients_and_name():
    head, _, body = RECIPIENTS_MAIL.partition(b"\r\n\r\n")
    reader = MailReader(parse_header_block(head + b"\r\n\r\n"), store=b"".join, max_text=MAX_STREAMED_TEXT)
    reader.add(parse_header_block(b"Content-Type: text/plain\r\n\r\n"), lambda: [body], len(body))
    streamed = reader.finish(Attachment)
    small = parse_message(RECIPIENTS_MAIL)
    assert (streamed.to, streamed.cc, streamed.sender_name) == (small.to, small.cc, small.sender_name)


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
           b"Content-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''inv%E2%80%AEfdp.exe\r\n"
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
           b"Content-Type: multipart/alternative; boundary=x\r\n\r\n"
           b"--x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
           b"--x\r\nContent-Type: text/html; charset=iso-8859-1\r\n\r\n<p>Gr\xfc\xdfe</p>\r\n--x--\r\n")
    mail = parse_message(raw)
    assert mail.body == "Grüße" and mail.body_html.strip() == "<p>Grüße</p>"
    assert mail.attachments == []


def test_an_html_only_mail_keeps_its_html_and_gets_a_text_body():
    mail = fixture("html-only.eml")
    assert "<script" in mail.body_html  # kept as sent; the web view sanitises where it shows it
    assert "<script" not in mail.body
    assert parse_message(b"Subject: plain\r\n\r\ntext").body_html is None


# -- one decoding for small and streamed mail ---------------------------------------------------

def _blob(size: int) -> bytes:
    out, seed = bytearray(), b"seed"
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


def _streamed(body: bytes, encoding: str, chunk: int) -> bytes:
    decoder = StreamDecoder(encoding)
    out = b"".join(decoder.feed(body[i:i + chunk]) for i in range(0, len(body), chunk))
    return out + decoder.finish()


def _one_attachment_mail(body: bytes, encoding: str = "base64") -> bytes:
    return (b"From: a@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n"
            b"\r\n--x\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--x\r\nContent-Type: application/pdf\r\n"
            b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n"
            b"Content-Disposition: attachment; filename=a.pdf\r\n\r\n" + body + b"\r\n--x--\r\n")


def test_a_stray_padded_line_before_the_base64_decodes_the_same_on_both_paths():
    blob = _blob(100_003)
    body = b"A===\r\n" + base64.encodebytes(blob).replace(b"\n", b"\r\n")
    (attachment,) = parse_message(_one_attachment_mail(body)).attachments
    assert attachment.data == blob  # not the base64 text
    assert _streamed(body, "base64", 4096) == blob  # no binascii.Error


def test_padding_in_mid_stream_keeps_every_byte_on_both_paths():
    blob = _blob(650_009)
    # Encoded in pieces, as some mailers do: each piece of a length not divisible by 3 ends padded.
    pieces = [blob[:1000], blob[1000:300_002], blob[300_002:]]
    text = b"".join(base64.b64encode(p) for p in pieces)
    body = b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert b"=" in text.rstrip(b"=")  # padding in mid-stream
    (attachment,) = parse_message(_one_attachment_mail(body)).attachments
    assert attachment.data == blob
    assert _streamed(body, "base64", 65536) == blob


def _read_streamed(mail: mimegen.GenMail, cuts: list[int]):
    """The streamed path's reading of a mail (MailReader as mailimport feeds it), its leaves'
    raw bytes cut into chunks at the given points as partial fetches deliver them."""
    reader = MailReader(parse_header_block(mail.header), store=b"".join, max_text=MAX_STREAMED_TEXT)
    for leaf in mail.leaves:
        reader.add(parse_header_block(leaf.headers), lambda leaf=leaf: mimegen.chunked(leaf.body, cuts),
                   len(leaf.body))
    return reader.finish(Attachment)


@settings(max_examples=400, deadline=None)
@given(mimegen.mails(), st.lists(st.integers(0, 10 ** 6), max_size=8))
def test_streamed_and_small_mail_read_the_same(mail, cuts):
    small = parse_message(mail.raw)
    streamed = _read_streamed(mail, cuts)
    assert (streamed.subject, streamed.body, streamed.body_html) == (small.subject, small.body, small.body_html)
    assert (streamed.to, streamed.cc, streamed.sender_name) == (small.to, small.cc, small.sender_name)
    assert streamed.attachments == small.attachments
    assert len(small.attachments) == len([leaf for leaf in mail.leaves if not leaf.is_text_body])


_TOKENS = [b"begin 644 x.bin\n", b"end\n", b"\n", b"\r\n", b"=", b"==", b"A===", b"QUJD", b"QQ", b"M86)C\n",
           b"=3D", b"=\r", b"=\n", b"=zz", b" ", b"\t", b"`\n", b"#86)C\n", b"!", b"\xe9", b"\x00"]


@settings(max_examples=400)
@given(st.sampled_from(["base64", "quoted-printable", "x-uuencode", "8bit"]),
       st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=20), max_size=40),
       st.lists(st.integers(0, 2000), max_size=10))
def test_where_the_chunks_are_cut_never_changes_the_decoding(encoding, tokens, cuts):
    body = b"".join(tokens)
    decoder = StreamDecoder(encoding)
    streamed = b"".join(decoder.feed(chunk) for chunk in mimegen.chunked(body, cuts)) + decoder.finish()
    assert streamed == decode_transfer(body, encoding)


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=4), st.data())
def test_lenient_base64_recovers_pieces_and_skips_stray_lines(data, piece_cuts, draw):
    cuts = sorted(piece_cuts)
    text = b"".join(base64.b64encode(data[a:b]) for a, b in zip([0] + cuts, cuts + [len(data)], strict=True))
    groups = [text[i:i + 4] for i in range(0, len(text), 4)]
    for _ in range(draw.draw(st.integers(0, 4))):  # between groups: stray lines, junk, line breaks
        groups.insert(draw.draw(st.integers(0, len(groups))),
                      draw.draw(st.sampled_from([b"\r\nA===\r\n", b"\n====\n", b"=", b"!", b" ", b"\r\n", b"\xe9"])))
    body = b"".join(groups)
    assert decode_transfer(body, "base64") == data
    chunks = mimegen.chunked(body, draw.draw(st.lists(st.integers(0, 5000), max_size=8)))
    decoder = StreamDecoder("base64")
    assert b"".join(decoder.feed(chunk) for chunk in chunks) + decoder.finish() == data


@pytest.mark.parametrize("body, expected", [
    (b"begin 644 a.txt\n#86)C\n`\nend\n", b"abc"),
    (b"\n\nbegin 644 a.txt\r\n#86)C\r\n`\r\nend\r\nsignature\n", b"abc"),  # blank lines before, text after
    (b"begin 644 a.txt\n#86)C!!\n\n#86)C\nend\n", b"abc"),  # junk after a line's length; a blank line ends
    (b"not uuencoded\nat all\n", b"not uuencoded\nat all\n"),
    (b"\n\n", b"\n\n"),
])
def test_uuencode_rules(body, expected):
    assert decode_transfer(body, "x-uuencode") == expected
    assert parse_message(_one_attachment_mail(body, "x-uuencode")).attachments[0].data == expected


def test_an_attached_mail_is_kept_byte_for_byte_and_named_after_its_subject():
    inner = b"Subject: Angebot\r\nX-Long: " + b"word " * 40 + b"\r\n\tfolded\r\n\r\nInner body.\r\n"
    raw = _one_attachment_mail(inner, "7bit").replace(b"Content-Type: application/pdf", b"Content-Type: message/rfc822")
    raw = raw.replace(b"Content-Disposition: attachment; filename=a.pdf\r\n", b"")
    (attachment,) = parse_message(raw).attachments
    assert attachment.content_type == "message/rfc822" and attachment.filename == "Angebot.eml"
    assert attachment.data == inner


def test_the_transfer_encoding_is_read_without_case_or_spaces():
    (attachment,) = parse_message(_one_attachment_mail(b"YWJj", " Base64 ")).attachments
    assert attachment.data == b"abc"
