"""Invoice and credit note PDFs (reportlab): rendered from the Invoice aggregate, any time, identically."""

from __future__ import annotations

import io
from typing import Any
from xml.sax.saxutils import escape

from billing_ledger.domain.invoice import CREDIT_NOTE, Invoice
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle


def render_pdf(invoice: Invoice, *, issuer: str, issued_at: Any = None, due_at: Any = None) -> bytes:
    styles = getSampleStyleSheet()
    title = "Credit note" if invoice.document_type == CREDIT_NOTE else "Invoice"
    number = invoice.number or "DRAFT"
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(buffer, pagesize=A4, title=f"{title} {number}", author=issuer,
                            leftMargin=18 * mm, rightMargin=18 * mm, topMargin=18 * mm, bottomMargin=18 * mm)
    facts = [
        ["Number", number],
        ["Status", invoice.status],
        ["Billed to", invoice.tenant],
        ["Issuer", issuer],
        ["Currency (ISO 4217)", invoice.currency],
    ]
    if issued_at is not None:
        facts.append(["Issue date (ISO 8601)", issued_at.isoformat()])
    if due_at is not None:
        facts.append(["Due date (ISO 8601)", due_at.isoformat()])
    if invoice.period_start is not None and invoice.period_end is not None:
        facts.append(["Period", f"{invoice.period_start.isoformat()} to {invoice.period_end.isoformat()}"])
    rows = [["Description", "Quantity", "Unit price", f"Amount ({invoice.currency})"]]
    for item in invoice.lines:
        rows.append([Paragraph(escape(item["description"]), styles["BodyText"]), item.get("quantity") or "",
                     item.get("unit_amount") or "", item["amount"]])
    rows.append(["Total", "", "", str(invoice.total)])
    lines = Table(rows, colWidths=[95 * mm, 22 * mm, 25 * mm, 32 * mm], repeatRows=1)
    lines.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
        ("ALIGN", (1, 0), (-1, -1), "RIGHT"),
        ("LINEABOVE", (0, -1), (-1, -1), 1, colors.black),
        ("FONTNAME", (0, -1), (-1, -1), "Helvetica-Bold"),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    doc.build([Paragraph(f"{title} {number}", styles["Title"]), Table(facts, colWidths=[50 * mm, 120 * mm]),
               Spacer(1, 8 * mm), lines])
    return buffer.getvalue()
