"""Mail HTML made safe to show inside the web view (pure, no I/O).

ammonia (through nh3) keeps a safelist of tags and attributes: no script, no style, no event
handlers, no forms or frames, and only harmless URL schemes in links. On top of that no image
source survives at all: a remote image in a mail is usually a tracking pixel, and it must not
fire because someone opened the CRM page. Inline (cid:) images are among the documents.
"""

from __future__ import annotations

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


def sanitise_mail_html(markup: str) -> SafeHtml:
    clean = nh3.clean(
        markup,
        attribute_filter=_drop_image_sources,
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )
    # Every image left has lost its source (a browser shows its alt text, if any).
    return SafeHtml(markup=clean, blocked_images=clean.count("<img"))
