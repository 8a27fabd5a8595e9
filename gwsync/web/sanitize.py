"""Mail HTML made safe to show inside the web view (pure, no I/O).

ammonia (through nh3) keeps a safelist of tags and attributes: no script, no style, no event
handlers, no forms or frames, and only harmless URL schemes in links. On top of that no image
source survives by default: a remote image in a mail is usually a tracking pixel, and it must not
fire because someone opened the CRM page. Inline (cid:) images are among the documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import nh3


@dataclass(frozen=True)
class SafeHtml:
    markup: str
    blocked_images: int  # image sources removed (remote, inline cid: or other)


def _drop_image_sources(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute in ("src", "srcset"):
        return None
    return value


def _keep_remote_image_sources(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute == "srcset":
        return None
    if tag == "img" and attribute == "src" and not value.lower().startswith(("https://", "http://")):
        return None
    return value


def sanitise_mail_html(markup: str, remote_images: bool = False) -> SafeHtml:
    """`remote_images=True` is the reader's explicit choice ("load images"): http(s) image
    sources stay, everything else is as strict as by default."""
    clean = nh3.clean(
        markup,
        attribute_filter=_keep_remote_image_sources if remote_images else _drop_image_sources,
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )
    # Every image left without a source is one not shown (a browser shows its alt text, if any).
    blocked = len(re.findall(r"<img(?![^>]*\ssrc=)", clean))
    return SafeHtml(markup=clean, blocked_images=blocked)
