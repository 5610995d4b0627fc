"""Outputs that cannot run code in the notebook's front end, for ``--safe-results``.

JupyterLab and Notebook render an executed cell's outputs as trusted: HTML
runs its scripts and event handlers, ``application/javascript`` runs as is,
and widget or plotting MIME types load code. A runner that is not trusted
must not reach that, so under ``--safe-results`` a rich output keeps only:

- text (``text/plain``, ``text/latex``), JSON, and raster images;
- HTML, cleaned: only formatting tags and attributes stay; scripts, styles,
  frames, forms, event handlers and ``javascript:`` links are removed;
- Markdown and SVG only when they hold no such active content (else dropped).

Everything else (``application/javascript``, widget views, vendor MIME types)
is dropped, and the caller says so in one line.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from typing import Any

PASSED = frozenset(
    {
        "text/plain",
        "text/latex",
        "application/json",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/bmp",
    }
)
"""MIME types shown as they came: text and pixels."""

TAGS = frozenset(
    [
        "a",
        "abbr",
        "b",
        "blockquote",
        "br",
        "caption",
        "code",
        "col",
        "colgroup",
        "dd",
        "del",
        "div",
        "dl",
        "dt",
        "em",
        "figcaption",
        "figure",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "img",
        "ins",
        "kbd",
        "li",
        "ol",
        "p",
        "pre",
        "q",
        "s",
        "samp",
        "small",
        "span",
        "strong",
        "sub",
        "sup",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "u",
        "ul",
        "var",
    ]
)
"""HTML tags kept by :func:`clean_html`: formatting and tables."""

ATTRIBUTES = frozenset(
    {"align", "alt", "colspan", "height", "href", "rowspan", "src", "title", "width"}
)
"""HTML attributes kept (``href`` and ``src`` only with a safe scheme)."""

DROPPED_WITH_CONTENT = frozenset({"script", "style", "iframe", "object", "embed", "template"})
"""Tags whose content goes too (a script's text is not shown as text)."""

_SAFE_URL = re.compile(r"^(https?:|mailto:|#|/|\./|[\w.-]+(/|$|\?|#)|data:image/(png|jpeg|gif))")

_ACTIVE_MARKDOWN = frozenset(
    {"script", "style", "iframe", "object", "embed", "form", "svg", "math", "link", "meta"}
)
"""Tags that make Markdown active (its other HTML is rendered like HTML)."""

_ACTIVE_SVG = frozenset({"script", "foreignobject", "iframe", "object", "embed", "use", "a"})


_VOID = frozenset({"br", "hr", "img", "col"})
"""Tags that have no end tag (``<br/>`` must not become ``<br></br>``)."""

_CHECKED = {"text/markdown": _ACTIVE_MARKDOWN, "image/svg+xml": _ACTIVE_SVG}
"""MIME types kept only when they hold none of these tags (nor handlers, nor javascript:)."""


def _safe_url(value: str) -> bool:
    return bool(_SAFE_URL.match(re.sub(r"[\s\x00-\x1f]", "", value).lower()))


class _Cleaner(HTMLParser):
    """Rebuilds HTML from an allow-list of tags and attributes; notes what it removed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.removed = False
        self._skipping: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROPPED_WITH_CONTENT:
            self._skipping.append(tag)
        if self._skipping or tag not in TAGS:
            self.removed = True
            return
        kept = []
        for name, value in attrs:
            value = value or ""
            if name in ATTRIBUTES and (name not in ("href", "src") or _safe_url(value)):
                kept.append(f' {name}="{html.escape(value, quote=True)}"')
            else:
                self.removed = True
        self.out.append(f"<{tag}{''.join(kept)}>")

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.pop()
            return
        if tag in TAGS and tag not in _VOID:
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(html.escape(data, quote=False))

    def handle_comment(self, data: str) -> None:
        self.removed = True

    def handle_pi(self, data: str) -> None:
        self.removed = True

    def unknown_decl(self, data: str) -> None:
        self.removed = True


def clean_html(text: str) -> tuple[str, bool]:
    """HTML with only formatting left, and whether anything was removed."""
    cleaner = _Cleaner()
    cleaner.feed(text)
    cleaner.close()
    return "".join(cleaner.out), cleaner.removed


class _Detector(HTMLParser):
    """Finds active content (scripts, handlers, frames, javascript: URLs) in markup."""

    def __init__(self, active_tags: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.active_tags = active_tags
        self.active = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.active_tags:
            self.active = True
        for name, value in attrs:
            if name.startswith("on") or (
                name in ("href", "src", "xlink:href", "action", "formaction")
                and not _safe_url(value or "")
            ):
                self.active = True

    handle_startendtag = handle_starttag


_ACTIVE_TEXT = re.compile(r"<\s*script|[\s/\"'`]on[a-z]+\s*=", re.IGNORECASE)
"""Scripts and event handlers however a browser would parse the markup: checked on the text."""


def _active(text: str, tags: frozenset[str]) -> bool:
    detector = _Detector(tags)
    detector.feed(text)
    detector.close()
    plain = html.unescape(text)  # entities, and the blanks a browser drops inside a URL scheme
    squeezed = re.sub(r"[\x00-\x20]", "", plain).lower()
    return detector.active or bool(_ACTIVE_TEXT.search(plain)) or "javascript:" in squeezed


def inert_bundle(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The inert part of a MIME bundle, and the MIME types dropped or cleaned."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for mime, value in data.items():
        if mime in PASSED:
            kept[mime] = value
        elif mime == "text/html" and isinstance(value, str):
            kept[mime], removed = clean_html(value)
            if removed:
                dropped.append("scripts and active parts of text/html")
        elif mime in _CHECKED and isinstance(value, str) and not _active(value, _CHECKED[mime]):
            kept[mime] = value
        else:
            dropped.append(mime)
    return kept, dropped
