"""Turning a raw mail into plain data: headers, text body, attachments (pure, no I/O).

Real mail is messy: malformed headers, unknown charsets, RFC 2047 words, nested multiparts,
HTML-only bodies, hostile attachment names. Every accessor here degrades to something readable
instead of raising, and records what it had to work around in `warnings`.

A small mail is parsed whole (parse_message); a large one arrives part by part over IMAP
(mailimport). Both read their leaf parts through the same MailReader and decode them with the
same StreamDecoder, so a mail gives the same body and the same attachment bytes on either path,
however its parts are cut into chunks.
"""

from __future__ import annotations

import binascii
import email
import email.header
import email.parser
import email.policy
import email.utils
import hashlib
import html
import html.parser
import mimetypes
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from email.message import Message
from functools import partial
from typing import Any, cast


@dataclass
class Attachment:
    filename: str  # sanitised, safe to show and to offer as a download name
    content_type: str
    data: bytes


@dataclass
class ParsedMail:
    message_id: str | None
    subject: str
    sender: str | None  # lower-cased address, None when the From header has none
    sender_name: str  # the From header's display name, RFC 2047 words decoded ("" when none)
    to: list[str]  # the To header's addresses, lower-cased, in order, each once
    cc: list[str]  # the Cc header's addresses, as `to`
    date: str | None  # ISO 8601 in UTC
    body: str
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    body_html: str | None = None  # the HTML body as sent (unsanitised: sanitise where it is shown)

    @property
    def recipients(self) -> list[str]:
        """To, then Cc: the order in which an outgoing mail's recipients are resolved."""
        return self.to + [a for a in self.cc if a not in self.to]


def content_key(raw: bytes) -> str:
    """The idempotency key of a mail: a hash of its exact bytes (Message-ID included).

    Message-ID alone is not an identity: many mails have none and different mails can share one.
    """
    return "mail:" + hashlib.sha256(raw).hexdigest()


# The header fields that make a mail what it is: what the activity keeps of it (sender, recipients,
# subject, date, Message-ID) and what says how to read its body (MIME-Version, Content-*). Every
# other field (Received, Delivered-To, Return-Path, X-Original-To, DKIM and spam stamps, Bcc in
# the sender's copy) is added or dropped on the way and differs between the copies of one mail.
_CONTENT_FIELDS = frozenset({b"message-id", b"from", b"to", b"cc", b"subject", b"date", b"mime-version"})
# Beyond this a header block is not looked at: such a mail keeps its exact-bytes key.
MAX_HEADER_BLOCK = 4 << 20


@dataclass(frozen=True)
class MailKeys:
    exact: str  # content_key: the hash of the exact bytes (the mail's id in `gwsync held`)
    activity: str  # the activity's idempotency key: by Message-ID and content, else `exact`


def _header_end(block: bytes) -> tuple[int, int] | None:
    """(end of the header block, start of the body) in `block`, at its first empty line."""
    text = b"\n" + block
    found = [(i, sep) for sep in (b"\n\r\n", b"\n\n") if (i := text.find(sep)) >= 0]
    if not found:
        return None
    i, sep = min(found)
    return i, i + len(sep) - 1


def _content_fields(header: bytes) -> list[bytes] | None:
    """The content header fields, unfolded, white space collapsed, names in lower case, sorted by
    name (stable); None when the mail has no Message-ID."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b" " + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().lower(), value))
    kept = sorted(((name, b" ".join(value.split())) for name, value in fields
                   if name in _CONTENT_FIELDS or name.startswith(b"content-")), key=lambda f: f[0])
    if not any(name == b"message-id" and value.strip(b"<> ") for name, value in kept):
        return None
    return [name + b": " + value for name, value in kept]


class MailKeyReader:
    """Both keys of a mail, fed its bytes in pieces (a streamed mail) or whole.

    The activity key of a mail with a Message-ID hashes its content header fields (see
    _CONTENT_FIELDS) and its body, byte for byte: the copies of one mail that several employees
    file (delivery headers differ) get one key; a copy whose body, attachments, subject or
    recipients differ (a forward, an edit) gets another. Without a Message-ID it is `exact`."""

    def __init__(self) -> None:
        self._exact = hashlib.sha256()
        self._head = bytearray()  # the start of the mail, until its header block ends
        self._content: Any = None  # the activity key's hash, once the header block was read
        self._given_up = False  # no Message-ID, or a header block too large to look at

    def feed(self, chunk: bytes) -> None:
        self._exact.update(chunk)
        if self._content is not None:
            self._content.update(chunk)
        elif not self._given_up:
            self._head += chunk
            end = _header_end(bytes(self._head))
            if end is not None:
                self._start(bytes(self._head[:end[0]]), bytes(self._head[end[1]:]))
            elif len(self._head) > MAX_HEADER_BLOCK:
                self._given_up, self._head = True, bytearray()

    def _start(self, header: bytes, body: bytes) -> None:
        fields = _content_fields(header)
        self._head = bytearray()
        if fields is None or len(header) > MAX_HEADER_BLOCK:
            self._given_up = True
            return
        self._content = hashlib.sha256(b"gwsync mail by Message-ID and content\n")
        for line in fields:
            self._content.update(line + b"\r\n")
        self._content.update(b"\r\n" + body)

    def finish(self) -> MailKeys:
        if self._content is None and not self._given_up:
            self._start(bytes(self._head), b"")  # headers only, no body
        exact = "mail:" + self._exact.hexdigest()
        return MailKeys(exact=exact, activity=exact if self._content is None
                        else "mail:message:" + self._content.hexdigest())


def mail_keys(raw: bytes) -> MailKeys:
    """The exact-bytes key and the activity key of a mail (see MailKeyReader)."""
    reader = MailKeyReader()
    reader.feed(raw)
    return reader.finish()


# compat32 parsing with explicit header decoding below: the modern policy's header registry
# costs about 3 ms per mail (measured), which alone would cap the import near 300 mails/s.
_POLICY = email.policy.compat32


class _Part(Message):
    """A compat32 part whose message/* content the parser leaves unparsed: its payload stays the
    raw bytes, as an IMAP server returns BODY[n] for it. So an attached mail is kept byte for byte
    (not parsed and written out again) and reads the same on the small and the streamed path."""

    _parsing = True  # set to False on every part once the parser is done

    def get_content_type(self) -> str:
        ctype = super().get_content_type()
        if self._parsing and ctype.startswith("message/"):
            return "application/x-unparsed-message"  # what the parser sees: not a message to descend into
        return ctype


def _parse(raw: bytes) -> Message:
    msg = email.message_from_bytes(raw, _class=_Part, policy=_POLICY)
    for part in msg.walk():
        if isinstance(part, _Part):  # every part is: the parser makes them of _class
            part._parsing = False
    return msg


def _raw_body(part: Message) -> bytes:
    """A leaf's body exactly as it was in the mail, still transfer-encoded."""
    # The public get_payload() would decode or re-encode it; typeshed does not declare _payload.
    payload = part._payload  # type: ignore[attr-defined]
    if isinstance(payload, str):  # the bytes parser keeps 8-bit bytes as surrogate escapes
        return payload.encode("ascii", "surrogateescape")
    return payload or b""


def parse_message(raw: bytes) -> ParsedMail:
    msg = _parse(raw)
    reader = MailReader(msg, store=b"".join)
    for part in _leaves(msg):
        reader.add(part, partial(_raw_chunks, part))
    return reader.finish(Attachment)


def _raw_chunks(part: Message) -> list[bytes]:
    return [_raw_body(part)]


def parse_headers(msg: Message, warnings: list[str]) -> dict:
    """The header fields gwsync maps, each read defensively."""
    sender_name, sender = _first_address(msg, "From", warnings)
    header_id = _header(msg, "Message-ID", warnings).strip()
    message_id = header_id.split()[0] if header_id.strip("<> ") else None
    return {
        "message_id": message_id,
        "subject": _clean_text(_header(msg, "Subject", warnings)),
        "sender": sender,
        "sender_name": sender_name,
        "to": _addresses(msg, "To", warnings),
        "cc": _addresses(msg, "Cc", warnings),
        "date": _date(_header(msg, "Date", warnings)),
    }


def _header_values(msg: Message, name: str, warnings: list[str]) -> list[str]:
    """All values of a header, RFC 2047 words and raw 8-bit bytes decoded."""
    try:
        raw_values = msg.get_all(name) or []
    except Exception as exc:
        warnings.append(f"header {name}: {exc}")
        return []
    return [_unfold(_header_text(value)) for value in raw_values]


def _header(msg: Message, name: str, warnings: list[str]) -> str:
    values = _header_values(msg, name, warnings)
    return values[0] if values else ""


def _header_text(value) -> str:
    if isinstance(value, email.header.Header):  # raw 8-bit bytes in the header (compat32)
        parts = []
        for chunk, charset in email.header.decode_header(value):
            parts.append(chunk if isinstance(chunk, str) else _decode_bytes(chunk, charset))
        return _decode_words("".join(parts))
    return _decode_words(str(value))


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", text)


def _decode_words(raw: str) -> str:
    """Decode RFC 2047 encoded words, tolerating unknown charsets."""
    if "=?" not in raw:
        return raw
    parts = []
    try:
        decoded = email.header.decode_header(raw)
    except Exception:
        return raw
    for chunk, charset in decoded:
        if isinstance(chunk, str):
            parts.append(chunk)
        else:
            parts.append(_decode_bytes(chunk, charset))
    return "".join(parts)


def _decode_bytes(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate or candidate == "unknown-8bit":
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    # cp1252 decodes what mislabelled "unknown-8bit" and latin-1 mail usually is.
    return data.decode("cp1252", errors="replace")


def _clean_text(text: str) -> str:
    text = text.replace("\x00", "")
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


def _address_pairs(msg: Message, name: str, warnings: list[str]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Each value of an address header (decoded, for a fallback search) with its (display name,
    address) pairs. The pairs are split before RFC 2047 words are decoded, so that an encoded
    comma or quote in a display name ("=?utf-8?q?M=C3=BCller=2C_Hans?=") cannot split it."""
    try:
        raw_values = msg.get_all(name) or []
    except Exception as exc:
        warnings.append(f"header {name}: {exc}")
        return
    for raw in raw_values:
        decoded = _unfold(_header_text(raw))
        if isinstance(raw, email.header.Header):  # raw 8-bit bytes: only the decoded text is readable
            pairs = email.utils.getaddresses([decoded])
        else:
            pairs = [(_decode_words(display), addr) for display, addr in email.utils.getaddresses([_unfold(raw)])]
        yield decoded, pairs


def _addresses(msg: Message, name: str, warnings: list[str]) -> list[str]:
    found: list[str] = []
    for _value, pairs in _address_pairs(msg, name, warnings):
        for _display, addr in pairs:
            addr = addr.strip().lower()
            if _ADDRESS.fullmatch(addr) and addr not in found:
                found.append(addr)
    return found


def _first_address(msg: Message, name: str, warnings: list[str]) -> tuple[str, str | None]:
    for value, pairs in _address_pairs(msg, name, warnings):
        for display, addr in pairs:
            addr = addr.strip()
            if _ADDRESS.fullmatch(addr):
                return _clean_text(display), addr.lower()
        # No parseable address: look for anything address-shaped in the raw text.
        match = _ADDRESS.search(value)
        if match:
            return _clean_text(value.replace(match.group(0), "").strip(" <>\"")), match.group(0).lower()
    return "", None


def _date(value: str) -> str | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat()


def _is_attachment(part: Message) -> bool:
    try:
        disposition = (part.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    return disposition == "attachment" or bool(_raw_filename(part))


def _leaves(msg: Message) -> Iterator[Message]:
    """Leaf parts in order; a message/* part (an attached mail) is one leaf, its content unparsed."""
    if msg.get_content_maintype() == "multipart":
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                yield from _leaves(cast(Message, sub))  # a multipart's payload is a list of parts
        return
    yield msg


def _raw_filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        try:
            param = part.get_param("name")
            # An RFC 2231 value is a tuple.
            name = email.utils.collapse_rfc2231_value(param) if isinstance(param, tuple) else param
        except Exception:
            name = None
    if name:
        name = _decode_words(str(name))
    return name or None


HEAD_BYTES = 64 << 10  # what is read of an attached mail to name it after its Subject


@dataclass
class _Stored:
    filename: str
    content_type: str
    stored: Any  # what the store function returned for the decoded bytes


class MailReader:
    """The one reading of a mail's leaf parts, for small mail (parse_message) and for mail
    streamed part by part (mailimport): the leaves come one at a time, in order, each as its MIME
    header block and a function giving its raw, still encoded bytes in chunks.

    The first text/plain and the first text/html leaf that are not attachments are the body and
    its HTML; further ones are alternative representations and skipped. A text leaf larger than
    `max_text` bytes becomes a document instead (the streamed path never holds more than that).
    Every other leaf is decoded by a StreamDecoder and handed to `store` as an iterator of
    bytes; `finish` turns what `store` returned into the mail's attachments.
    """

    def __init__(self, header: Message, store: Callable[[Iterator[bytes]], Any], max_text: int | None = None):
        self.warnings: list[str] = []
        self.headers = parse_headers(header, self.warnings)
        self.store = store
        self.max_text = max_text
        self.plain: str | None = None
        self.html: str | None = None
        self.stored: list[_Stored] = []

    def add(self, part: Message, raw: Callable[[], Iterable[bytes]], size: int | None = None) -> None:
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") and not _is_attachment(part):
            if (self.plain if ctype == "text/plain" else self.html) is not None:
                return  # an alternative representation of the body
            if self.max_text is None or (size or 0) <= self.max_text:
                data = decode_transfer(b"".join(raw()), transfer_encoding(part))
                text = body_text(data, part.get_content_charset(), self.warnings)
                if ctype == "text/plain":
                    self.plain = text
                else:
                    self.html = text
                return
        head = bytearray()
        stored = self.store(_keeping_head(_decoded(raw(), StreamDecoder(transfer_encoding(part))), head))
        self.stored.append(_Stored(_attachment_name(part, ctype, bytes(head)), ctype, stored))

    def finish(self, attachment: Callable[[str, str, Any], Any]) -> ParsedMail:
        """The parsed mail; `attachment(filename, content_type, stored)` makes each attachment."""
        if self.plain is not None:
            body = self.plain
        else:
            body = html_to_text(self.html) if self.html is not None else ""
        return ParsedMail(body=body.strip("\n"), body_html=self.html, warnings=self.warnings,
                          attachments=[attachment(s.filename, s.content_type, s.stored) for s in self.stored],
                          **self.headers)


def body_text(data: bytes, charset: str | None, warnings: list[str]) -> str:
    """A text part's decoded bytes as text: its charset, else UTF-8, else cp1252; LF line ends."""
    if charset:
        try:
            "".encode(charset)
        except LookupError:
            warnings.append(f"unknown charset {charset!r}, read as UTF-8/cp1252")
    return _decode_bytes(data, charset).replace("\r\n", "\n").replace("\x00", "")


def _attachment_name(part: Message, ctype: str, head: bytes) -> str:
    name = _raw_filename(part)
    if not name and ctype == "message/rfc822":  # an attached mail is named after its Subject
        inner = email.parser.BytesHeaderParser(policy=_POLICY).parsebytes(head)
        name = (_header(inner, "Subject", []) or "message") + ".eml"
    return sanitise_filename(name, ctype)


def _decoded(chunks: Iterable[bytes], decoder: StreamDecoder) -> Iterator[bytes]:
    for chunk in chunks:
        out = decoder.feed(chunk)
        if out:
            yield out
    tail = decoder.finish()
    if tail:
        yield tail


def _keeping_head(chunks: Iterator[bytes], head: bytearray) -> Iterator[bytes]:
    for chunk in chunks:
        if len(head) < HEAD_BYTES:
            head += chunk[:HEAD_BYTES - len(head)]
        yield chunk


_RESERVED = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
MAX_NAME_BYTES = 200


def _visible(char: str) -> str:
    category = unicodedata.category(char)
    if category == "Cf":
        return ""
    return "_" if category in ("Cc", "Cs", "Zl", "Zp") else char


def sanitise_filename(name: str | None, content_type: str = "application/octet-stream") -> str:
    """A file name safe to show and to offer as a download: no directories, no control bytes,
    no invisible format characters, no leading dots, at most 200 UTF-8 bytes with its extension kept.

    Format characters (Unicode category Cf: bidi overrides, embeddings, isolates and marks,
    zero-width spaces and joiners, BOM) are removed: "inv\\u202efdp.exe" would show as "invexe.pdf".
    Control characters, line and paragraph separators become "_".
    """
    name = name or ""
    if not name.isprintable():  # the rare name with a control, format or separator character
        name = "".join(_visible(c) for c in name)
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _RESERVED.sub("_", name).strip().lstrip(".").strip()
    if not name or set(name) <= {"_", "."}:
        ext = mimetypes.guess_extension(content_type) or ".bin"
        name = "attachment" + ext
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if not dot or len(ext) > 10:
            stem, ext = name, ""
        budget = MAX_NAME_BYTES - len(ext.encode("utf-8")) - (1 if ext else 0)
        stem = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


class _TextExtractor(html.parser.HTMLParser):
    _BLOCK = frozenset({"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre"})
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    text = "".join(parser.out)
    text = re.sub(r"[ \t\xa0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(c for c in range(256) if c not in _BASE64_ALPHABET + b"=")
_UUENCODE = ("x-uuencode", "uuencode", "uue", "x-uue")
_UU_BEGIN = re.compile(rb"begin [0-7]+(?: |$)")


def transfer_encoding(part: Message) -> str:
    """A part's Content-Transfer-Encoding as both paths read it: case and surrounding spaces ignored."""
    try:
        value = str(part.get("Content-Transfer-Encoding", "") or "")
    except Exception:
        value = ""
    return value.strip().lower() or "7bit"


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """A whole part decoded: the same bytes as StreamDecoder fed in chunks."""
    decoder = StreamDecoder(encoding)
    return decoder.feed(data) + decoder.finish()


class StreamDecoder:
    """Decodes a Content-Transfer-Encoding fed in chunks: the one decoding of every mail part.

    Small mail feeds it a whole part, streamed mail feeds it partial fetches; where the chunks are
    cut never changes the result. It never raises: broken input is read by these lenient rules.

    base64: characters outside the base64 alphabet are skipped (line breaks, spaces, junk). The
      data characters form groups of four, and a "=" ends the current group early: a group of 2 or
      3 characters followed by "=" gives 1 or 2 bytes, as final padding does, and decoding goes on
      after it, so pieces encoded one after another (padding in mid-stream) decode whole. A "="
      after a single character drops that character (6 bits are no byte; a stray "A===" line adds
      nothing); a "=" with no group open is skipped. At the end, an unfinished group of 2 or 3
      characters decodes as if padded, a single character is dropped.
      (The email package's own decoding differs: it stops at the first padding, and when the count
      of characters does not fit, it returns the base64 text itself.)
    quoted-printable: binascii.a2b_qp, one line at a time (a line is decoded once its LF has
      arrived): "=XX" escapes and soft line breaks; a malformed escape is kept as it is.
    x-uuencode (uuencode, uue, x-uue): if the first line that is not blank is "begin <mode> ...",
      the lines after it are decoded up to "end" or a blank line, and the rest is ignored; a line
      that does not decode is decoded as far as its length character says, or else skipped. A part
      whose first line is no "begin" line is not uuencoded and is kept as sent.
    anything else (7bit, 8bit, binary, unknown names): the bytes as sent.
    """

    def __init__(self, encoding: str | None):
        self.encoding = (encoding or "7bit").strip().lower()
        self.pending = b""
        self.uu_state = "start"  # start (only blank lines so far), data, end, raw
        self.uu_blank = b""  # the blank lines before the first other line

    def feed(self, chunk: bytes) -> bytes:
        if self.encoding == "base64":
            return self._base64(chunk)
        if self.encoding == "quoted-printable":
            data = self.pending + chunk
            cut = data.rfind(b"\n") + 1  # after an LF, a2b_qp has no escape open
            self.pending = data[cut:]
            return binascii.a2b_qp(data[:cut])
        if self.encoding in _UUENCODE:
            return self._uu(chunk)
        return chunk

    def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        if self.encoding == "base64":
            return _base64_group(rest)
        if self.encoding == "quoted-printable":
            return binascii.a2b_qp(rest)
        if self.encoding in _UUENCODE:
            out = self._uu_line(rest) if rest else b""
            return out + (self.uu_blank if self.uu_state == "start" else b"")
        return rest

    def _base64(self, chunk: bytes) -> bytes:
        data = self.pending + chunk.translate(None, _NOT_BASE64)
        *closed, open_group = data.split(b"=")  # every "=" ends the group before it
        out = [_base64_group(run) for run in closed]
        usable = len(open_group) - len(open_group) % 4
        self.pending = open_group[usable:]  # fewer than four data characters, no "="
        out.append(binascii.a2b_base64(open_group[:usable]))
        return b"".join(out)

    def _uu(self, chunk: bytes) -> bytes:
        if self.uu_state == "raw":
            return chunk
        data = self.pending + chunk
        cut = data.rfind(b"\n") + 1
        self.pending = data[cut:]
        out = []
        lines = data[:cut].split(b"\n")[:-1]
        for index, line in enumerate(lines):
            out.append(self._uu_line(line + b"\n"))
            if self.uu_state == "raw":  # not uuencoded: the rest passes through
                out.append(b"".join(rest + b"\n" for rest in lines[index + 1:]) + self.pending)
                self.pending = b""
                break
        return b"".join(out)

    def _uu_line(self, line: bytes) -> bytes:
        text = line.rstrip(b"\r\n")
        if self.uu_state == "start":
            if not text.strip():
                self.uu_blank += line
                return b""
            if _UU_BEGIN.match(text):
                self.uu_state, self.uu_blank = "data", b""
                return b""
            self.uu_state = "raw"
            out, self.uu_blank = self.uu_blank + line, b""
            return out
        if self.uu_state == "data":
            if not text or text.strip(b" \t\r\n\f") == b"end":
                self.uu_state = "end"
                return b""
            return _uu_decode_line(text)
        return b""


def _base64_group(run: bytes) -> bytes:
    """Base64 data characters ended by padding or by the end of the part."""
    rest = len(run) % 4
    if rest == 1:
        run, rest = run[:-1], 0
    return binascii.a2b_base64(run + b"=" * (-rest % 4)) if run else b""


def _uu_decode_line(text: bytes) -> bytes:
    try:
        return binascii.a2b_uu(text)
    except binascii.Error:
        # Broken encoders add characters past the line's length: decode what the length says.
        length = (((text[0] - 32) & 63) * 4 + 5) // 3
        try:
            return binascii.a2b_uu(text[:length])
        except binascii.Error:
            return b""


def parse_header_block(raw_headers: bytes) -> Message:
    """Parse just a header block (for streamed mails whose body is fetched part by part)."""
    return email.message_from_bytes(raw_headers, policy=_POLICY)
