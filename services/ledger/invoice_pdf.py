"""Invoice and credit note PDFs (reportlab): rendered from the Invoice aggregate, any time, identically.

One rendering for the emailed copy (``notifier``) and the download (``GET .../invoices/{id}.pdf``): dates, customer
and seller come from what the invoice recorded when it was finalized, never from today's profile or settings.
"""

from __future__ import annotations

import io
from typing import Any
from xml.sax.saxutils import escape

from billing_ledger.domain.invoice import CREDIT_NOTE, Invoice
from billing_ledger.domain.tax import EU_MEMBER_STATES
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle


def render_pdf(invoice: Invoice, *, issuer: str) -> bytes:
    """The document's PDF, from the invoice alone: the emailed copy and every download are this same rendering.
    ``issuer`` names the seller of a document finalized before the seller was recorded on it (session 12)."""
    styles = getSampleStyleSheet()
    title = "Credit note" if invoice.document_type == CREDIT_NOTE else "Invoice"
    number = invoice.number or "DRAFT"
    seller = invoice.seller or {"name": issuer}
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(buffer, pagesize=A4, title=f"{title} {number}", author=seller.get("name") or issuer,
                            leftMargin=18 * mm, rightMargin=18 * mm, topMargin=18 * mm, bottomMargin=18 * mm)
    facts: list[list[Any]] = [["Number", number], ["Status", invoice.status]]
    if invoice.issued_at is not None:
        facts.append(["Issue date (ISO 8601)", invoice.issued_at.isoformat()])
    if invoice.due_at is not None:
        facts.append(["Due date (ISO 8601)", invoice.due_at.isoformat()])
    facts += _party("Billed to", "Customer", invoice.billed_to or {}, invoice.tenant, styles)
    if (invoice.billed_to or {}).get("business_name"):
        facts.append(["Customer account", invoice.tenant])
    facts += _party("Issuer", "Issuer", {**seller, "tax_id": seller.get("vat_id")}, issuer, styles)
    facts.append(["Currency (ISO 4217)", invoice.currency])
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


def _party(role: str, prefix: str, party: dict[str, Any], fallback: str, styles: Any) -> list[list[Any]]:
    """A party's rows: its name, its address (the seller's, when the catalogue declares one), its country (ISO 3166:
    ``US-CA`` with a subdivision) and its VAT or tax id."""
    name = party.get("business_name") or party.get("name") or fallback
    rows: list[list[Any]] = [[role, Paragraph(escape(name), styles["BodyText"])]]
    if party.get("address"):
        rows.append([f"{prefix} address", Paragraph(escape(party["address"]).replace("\n", "<br/>"),
                                                    styles["BodyText"])])
    country = party.get("country")
    if country:
        subdivision = party.get("subdivision")
        rows.append([f"{prefix} country (ISO 3166)", f"{country}-{subdivision}" if subdivision else country])
    if party.get("tax_id"):
        label = "VAT id" if country in EU_MEMBER_STATES else "Tax id"
        rows.append([f"{prefix} {label}", party["tax_id"]])
    return rows
