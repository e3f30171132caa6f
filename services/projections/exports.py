"""CSV exports (RFC 4180) of any list the API returns: the same rows, flattened, every page streamed."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from billing_projections.limits import CSV_PAGE_ITEMS, CSV_ROWS_MAX
from fastapi.responses import StreamingResponse

# Fetches one page: (cursor, page size) -> (items, next cursor or None).
PageFetcher = Callable[[str | None, int], Awaitable[tuple[list[dict[str, Any]], str | None]]]


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


def csv_response(columns: Sequence[str], fetch: PageFetcher, filename: str) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        yield _line(columns)
        cursor: str | None = None
        written = 0
        while written < CSV_ROWS_MAX:
            items, cursor = await fetch(cursor, min(CSV_PAGE_ITEMS, CSV_ROWS_MAX - written))
            for item in items:
                yield _line([item.get(c) for c in columns])
            written += len(items)
            if cursor is None or not items:
                return

    return StreamingResponse(body(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'})


def csv_of(columns: Sequence[str], items: list[dict[str, Any]], filename: str) -> StreamingResponse:
    async def single(cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        return items[:CSV_ROWS_MAX], None

    return csv_response(columns, single, filename)
