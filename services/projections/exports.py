"""CSV exports (RFC 4180) of any list the API returns: the same rows, flattened, every page streamed.

An export has no row cap: it reads its list a page (``CSV_PAGE_ITEMS``) at a time through the list's keyset cursor
and writes each page before reading the next, so it holds one page whatever its length (the ASGI server waits for
a slow client before the next page is read). The first page is read before the response starts: the list functions
check their filters when they read (an unknown ``type`` or ``status``, a bad ``period``), so bad input is the same
422 problem+json as the JSON form's, never a ``200 text/csv`` whose stream breaks. A failure after that (the
database) propagates from the body: the server aborts the connection without the chunked body's last chunk, so a
client never takes a cut file for a complete one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from billing_projections.limits import CSV_PAGE_ITEMS
from fastapi.responses import StreamingResponse

Page = tuple[list[dict[str, Any]], str | None]
# Fetches one page: (cursor, page size) -> (items, next cursor or None).
PageFetcher = Callable[[str | None, int], Awaitable[Page]]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":")) if value else ""
    return str(value)


def _line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([_cell(v) for v in values])
    return buffer.getvalue()


async def csv_response(columns: Sequence[str], fetch: PageFetcher, filename: str) -> StreamingResponse:
    """Every page of ``fetch`` as CSV; its first page read now, so that bad input raises before any byte is sent."""
    return _streamed(columns, await fetch(None, CSV_PAGE_ITEMS), fetch, filename)


def csv_of(columns: Sequence[str], items: list[dict[str, Any]], filename: str) -> StreamingResponse:
    """A list already read whole (the lists without pages) as CSV."""
    return _streamed(columns, (items, None), None, filename)


def csv_text(columns: Sequence[str], items: list[dict[str, Any]]) -> str:
    """A list as the CSV text :func:`csv_of` sends (the same header, cells and line ends), for the command line."""
    return _line(columns) + "".join(_line([item.get(c) for c in columns]) for item in items)


def _streamed(columns: Sequence[str], first: Page, fetch: PageFetcher | None, filename: str) -> StreamingResponse:
    async def body(items: list[dict[str, Any]], cursor: str | None) -> AsyncIterator[str]:
        yield _line(columns)
        while True:
            for item in items:
                yield _line([item.get(c) for c in columns])
            if fetch is None or cursor is None or not items:
                return
            items = []  # the page written is let go before the next is read: one page held, not two
            items, cursor = await fetch(cursor, CSV_PAGE_ITEMS)

    return StreamingResponse(body(*first), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'})
