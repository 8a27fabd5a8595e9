"""Turning a raw mail into plain data: headers, text body, attachments (pure, no I/O).

Real mail is messy: malformed headers, unknown charsets, RFC 2047 words, nested multiparts,
HTML-only bodies, hostile attachment names. Every accessor here degrades to something readable
instead of raising, and records what it had to work around in `warnings`.
"""

from __future__ import annotations

import binascii
import email
import email.header
import email.policy
import email.utils
import hashlib
import html
import html.parser
import mimetypes
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import timezone
from email.message import EmailMessage, Message


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
    sender_name: str
    recipients: list[str]
    date: str | None  # ISO 8601 in UTC
    body: str
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    body_html: str | None = None  # the HTML body as sent (unsanitised: sanitise where it is shown)


def content_key(raw: bytes) -> str:
    """The idempotency key of a mail: a hash of its exact bytes (Message-ID included).

    Message-ID alone is not an identity: many mails have none and different mails can share one.
    """
    return "mail:" + hashlib.sha256(raw).hexdigest()


# compat32 parsing with explicit header decoding below: the modern policy's header registry
# costs about 3 ms per mail (measured), which alone would cap the import near 300 mails/s.
_POLICY = email.policy.compat32


def parse_message(raw: bytes) -> ParsedMail:
    msg = email.message_from_bytes(raw, policy=_POLICY)
    warnings: list[str] = []
    headers = parse_headers(msg, warnings)
    plain_part, html_part = _find_body(msg)
    body_html = _text_of(html_part, warnings) if html_part is not None else None
    if plain_part is not None:
        body = _text_of(plain_part, warnings)
    else:
        body = html_to_text(body_html) if body_html is not None else ""
    attachments: list[Attachment] = []
    _collect_attachments(msg, plain_part or html_part, attachments, warnings)
    return ParsedMail(body=body.strip("\n"), attachments=attachments, warnings=warnings, body_html=body_html,
                      **headers)


def parse_headers(msg: Message, warnings: list[str]) -> dict:
    """The header fields gwsync maps, each read defensively."""
    sender_name, sender = _first_address(msg, "From", warnings)
    recipients = []
    for name in ("To", "Cc"):
        for value in _header_values(msg, name, warnings):
            for _display, addr in email.utils.getaddresses([value]):
                if addr and "@" in addr:
                    recipients.append(addr.strip().lower())
    message_id = _header(msg, "Message-ID", warnings).strip()
    message_id = message_id.split()[0] if message_id.strip("<> ") else None
    return {
        "message_id": message_id,
        "subject": _clean_text(_header(msg, "Subject", warnings)),
        "sender": sender,
        "sender_name": sender_name,
        "recipients": recipients,
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


def _first_address(msg: Message, name: str, warnings: list[str]) -> tuple[str, str | None]:
    for value in _header_values(msg, name, warnings):
        pairs = email.utils.getaddresses([value])
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
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat()


def _is_attachment(part: Message) -> bool:
    try:
        disposition = (part.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    return disposition == "attachment" or bool(_raw_filename(part))


def _find_body(msg: Message) -> tuple[Message | None, Message | None]:
    """The parts that carry the mail's text: the first plain text and the first HTML part."""
    plain = html_part = None
    for part in _leaves(msg):
        if _is_attachment(part):
            continue
        subtype = part.get_content_type()
        if subtype == "text/plain" and plain is None:
            plain = part
        elif subtype == "text/html" and html_part is None:
            html_part = part
    return plain, html_part


def _leaves(msg: Message):
    """Leaf parts in order; an attached message/rfc822 counts as one leaf."""
    if msg.get_content_maintype() == "multipart":
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                yield from _leaves(sub)
        return
    yield msg


def _text_of(part: Message, warnings: list[str]) -> str:
    try:
        data = part.get_payload(decode=True) or b""
    except Exception as exc:
        warnings.append(f"body: {exc}")
        return ""
    charset = part.get_content_charset()
    if charset:
        try:
            "".encode(charset)
        except LookupError:
            warnings.append(f"unknown charset {charset!r}, read as UTF-8/cp1252")
    return _decode_bytes(data, charset).replace("\r\n", "\n").replace("\x00", "")


def _raw_filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        try:
            name = part.get_param("name")
            if isinstance(name, tuple):  # RFC 2231 value
                name = email.utils.collapse_rfc2231_value(name)
        except Exception:
            name = None
    if name:
        name = _decode_words(str(name))
    return name or None


def _collect_attachments(msg: Message, body_part: Message | None, out: list[Attachment],
                         warnings: list[str]) -> None:
    for part in _leaves(msg):
        if part is body_part:
            continue
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") and not _is_attachment(part):
            continue  # the body's alternative representation, not a document
        if ctype == "message/rfc822":
            inner = part.get_payload()
            inner_msg = inner[0] if isinstance(inner, list) and inner else None
            data = inner_msg.as_bytes() if inner_msg is not None else b""
            name = _raw_filename(part) or ((_header(inner_msg, "Subject", warnings) or "message") + ".eml"
                                           if inner_msg is not None else "message.eml")
        else:
            try:
                data = part.get_payload(decode=True) or b""
            except Exception as exc:
                warnings.append(f"attachment: {exc}")
                continue
            name = _raw_filename(part)
        out.append(Attachment(filename=sanitise_filename(name, ctype), content_type=ctype, data=data))


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
    _BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre"}
    _SKIP = {"script", "style", "head", "title"}

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


class StreamDecoder:
    """Decodes a Content-Transfer-Encoding incrementally, for attachments too big to hold."""

    def __init__(self, encoding: str | None):
        self.encoding = (encoding or "7bit").lower()
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.encoding == "base64":
            data = self.pending + re.sub(rb"[^A-Za-z0-9+/=]", b"", chunk)
            usable = len(data) - len(data) % 4
            self.pending = data[usable:]
            return binascii.a2b_base64(data[:usable]) if usable else b""
        if self.encoding == "quoted-printable":
            data = self.pending + chunk
            cut = data.rfind(b"\n") + 1
            self.pending = data[cut:]
            return binascii.a2b_qp(data[:cut])
        return chunk

    def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        if not rest:
            return b""
        if self.encoding == "base64":
            rest = rest + b"=" * (-len(rest) % 4)
            try:
                return binascii.a2b_base64(rest)
            except binascii.Error:
                return b""
        if self.encoding == "quoted-printable":
            return binascii.a2b_qp(rest)
        return rest


def parse_header_block(raw_headers: bytes) -> EmailMessage:
    """Parse just a header block (for streamed mails whose body is fetched part by part)."""
    return email.message_from_bytes(raw_headers, policy=_POLICY)
