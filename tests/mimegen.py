"""Random MIME mails for the property tests: leaves of random bytes in every transfer encoding,
with the malformations real mail has (stray base64 lines such as `A===`, padding in mid-stream,
junk characters, odd line lengths, broken quoted-printable escapes, bare LF, no final newline).

Each generated mail keeps its leaves' raw (still encoded) bytes exactly as they sit between the
part's header block and the next boundary: what an IMAP server returns as BODY[n].
"""

from __future__ import annotations

import base64
import binascii
import quopri
import urllib.parse
from dataclasses import dataclass

from hypothesis import assume
from hypothesis import strategies as st


@dataclass
class Leaf:
    headers: bytes  # the MIME header block, blank line included
    body: bytes  # the raw, encoded body
    is_text_body: bool  # a text/plain or text/html part without disposition


@dataclass
class GenMail:
    raw: bytes
    header: bytes  # the mail's header block, blank line included
    leaves: list[Leaf]
    multipart: bool


ENCODINGS = ["base64", "quoted-printable", "7bit", "8bit", "x-uuencode"]
STRAY_LINES = [b"A===", b"====", b"=", b"A", b"AB==", b"!!junk!!", b" ", b"", b"-- ", b"\t"]
QP_JUNK = [b"=", b"=\r", b"=4", b"=zz", b"=\n", b"==", b"=3D", b"\r", b"\t \n", b"=\r\n", b"=e9", b"= \n"]


def _lines(text: bytes, width: int) -> list[bytes]:
    return [text[i:i + width] for i in range(0, len(text), width)] or [b""]


@st.composite
def base64_body(draw, data: bytes, nl: bytes) -> bytes:
    # Encoded in pieces: every piece whose length is not a multiple of 3 leaves padding in mid-stream.
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]
    text = b"".join(base64.b64encode(p) for p in pieces)
    lines = _lines(text, draw(st.sampled_from([76, 64, 4, 72]) | st.integers(1, 120)))
    for _ in range(draw(st.integers(0, 3))):  # stray lines anywhere
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(STRAY_LINES)))
    if draw(st.booleans()):  # junk characters inside lines
        at = draw(st.integers(0, len(lines) - 1))
        col = draw(st.integers(0, len(lines[at])))
        lines[at] = lines[at][:col] + draw(st.sampled_from([b"*", b" ", b"\xe9", b"-", b"."])) + lines[at][col:]
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from([b"trailing garbage!", b"-- ", b"==", b"Zm9v", b"A"])))
    return nl.join(lines) + draw(st.sampled_from([b"", nl]))


@st.composite
def qp_body(draw, data: bytes, nl: bytes) -> bytes:
    text = quopri.encodestring(data).replace(b"\n", nl)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(QP_JUNK)) + text[at:]
    return text


@st.composite
def uu_body(draw, data: bytes, nl: bytes) -> bytes:
    lines = [b"begin 644 file.bin"] + [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n")
                                       for i in range(0, len(data), 45)] + [b"`", b"end"]
    variant = draw(st.sampled_from(["plain", "leading blank", "no begin", "truncated", "text after end",
                                    "broken line"]))
    if variant == "leading blank":
        lines = [b"", b""] + lines
    elif variant == "no begin":
        lines = lines[1:]
    elif variant == "truncated":
        lines = lines[:max(1, len(lines) // 2)] + [b""] + lines[max(1, len(lines) // 2):]
    elif variant == "text after end":
        lines += [b"-- ", b"signature"]
    elif variant == "broken line" and len(lines) > 3:
        lines[1] = lines[1] + b"!!"
    return nl.join(lines) + nl


@st.composite
def encoded(draw, data: bytes, nl: bytes, encodings=ENCODINGS) -> tuple[str, bytes]:
    encoding = draw(st.sampled_from(encodings))
    if encoding == "base64":
        body = draw(base64_body(data, nl))
    elif encoding == "quoted-printable":
        body = draw(qp_body(data, nl))
    elif encoding == "x-uuencode":
        body = draw(uu_body(data, nl))
    else:
        body = data
    spelled = draw(st.sampled_from([encoding, encoding.upper(), f" {encoding} ", encoding.title()]))
    return spelled, body


FILENAMES = st.text(max_size=40) | st.sampled_from(["inv\u202efdp.exe", "report.pdf", "../x", "a\u200bb.txt"])


@st.composite
def attachment_leaf(draw, nl: bytes, max_size: int, whole_messages: bool) -> Leaf:
    data = draw(st.binary(max_size=max_size))
    ctype = draw(st.sampled_from(["application/octet-stream", "application/pdf", "image/png", "text/plain",
                                  "message/rfc822", "message/delivery-status"]))
    if ctype == "message/rfc822" and whole_messages:
        # Dovecot reads an attached mail without the blank line after its header as ending with
        # the line break before the next boundary: BODY[n] is then one CRLF longer.
        data = b"Subject: inner" + nl + nl + data
        encoding, body = draw(encoded(data, nl, ["7bit", "8bit", "base64"]))
    else:
        encoding, body = draw(encoded(data, nl))
    name = urllib.parse.quote(draw(FILENAMES).encode("utf-8"))
    disposition = draw(st.sampled_from([f"attachment; filename*=utf-8''{name}", "attachment", "inline",
                                        f"inline; filename*=utf-8''{name}"]))
    if ctype.startswith("text/"):
        disposition = disposition.replace("inline", "attachment")  # else it may be one more text body
    headers = (f"Content-Type: {ctype}{nl.decode()}Content-Transfer-Encoding: {encoding}{nl.decode()}"
               f"Content-Disposition: {disposition}{nl.decode()}{nl.decode()}").encode()
    return Leaf(headers=headers, body=body, is_text_body=False)


@st.composite
def text_leaf(draw, subtype: str, nl: bytes) -> Leaf:
    text = draw(st.text(max_size=300))
    charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "x-unknown"]))
    data = text.encode("utf-8" if charset != "iso-8859-1" else "latin-1", "replace")
    encoding, body = draw(encoded(data, nl, ["base64", "quoted-printable", "8bit"]))
    headers = (f"Content-Type: text/{subtype}; charset={charset}{nl.decode()}"
               f"Content-Transfer-Encoding: {encoding}{nl.decode()}{nl.decode()}").encode()
    return Leaf(headers=headers, body=body, is_text_body=True)


@st.composite
def mails(draw, max_size: int = 3000, max_attachments: int = 4, whole_messages: bool = False) -> GenMail:
    """`whole_messages`: an attached message/rfc822 always has a header and its blank line."""
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    boundary = f"=_{draw(st.integers(0, 2 ** 64)):x}".encode()
    leaves: list[Leaf] = []
    if draw(st.booleans()):
        leaves.append(draw(text_leaf("plain", nl)))
    if draw(st.booleans()):
        leaves.append(draw(text_leaf("html", nl)))
    leaves += draw(st.lists(attachment_leaf(nl, max_size, whole_messages), max_size=max_attachments))
    header = nl.join([b"From: Someone <someone@example.org>", b"To: alice@example.com",
                      b"Subject: generated " + boundary, b"MIME-Version: 1.0"]) + nl
    if len(leaves) == 1 and draw(st.booleans()):  # a single-part mail: the leaf's headers are the mail's
        leaf = leaves[0]
        tail = draw(st.sampled_from([b"", nl]))  # with or without a final newline
        leaf = Leaf(headers=header + leaf.headers, body=leaf.body + tail, is_text_body=leaf.is_text_body)
        return GenMail(raw=leaf.headers + leaf.body, header=leaf.headers, leaves=[leaf], multipart=False)
    header += b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"" + nl + nl
    delimiter = b"--" + boundary
    for leaf in leaves:  # a body that holds the delimiter would end the part early
        assume(delimiter not in leaf.body and delimiter not in leaf.headers)
        # A bare CR ending a body of an LF mail would join the LF before the delimiter: CRLF.
        assume(nl == b"\r\n" or not leaf.body.endswith(b"\r"))
    raw = header + b"preamble" + nl
    for leaf in leaves:
        raw += delimiter + nl + leaf.headers + leaf.body + nl
    raw += delimiter + b"--" + nl
    return GenMail(raw=raw, header=header, leaves=leaves, multipart=True)


def chunked(data: bytes, cuts: list[int]):
    """`data` cut at the given points (taken modulo its length), as a streamed fetch delivers it."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for p in points + [len(data)]:
        yield data[start:p]
        start = p
