"""Extracts FINDINGS and IMPRESSION from free-text radiology reports.

MIMIC-CXR reports are loosely structured: headers such as 'FINDINGS:', 'Findings :', 'IMPRESSION:'
or 'FINDINGS AND IMPRESSION:' vary in case and spacing; some reports have only one of the two, some
neither. When neither is present the final section stands in for the impression (it is where
radiologists put their conclusion), and a report with no headers at all is taken whole.
"""

from __future__ import annotations

import re

# A header is a short run of words at the start of a line followed by a colon.
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()-]{0,40}?)[ \t]*:", re.MULTILINE)
_FINDINGS_NAMES = ("FINDINGS", "FINDING")
_IMPRESSION_NAMES = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS")


def _clean(text: str) -> str:
    return " ".join(text.split())


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(HEADER, body), ...] in order; text before the first header gets the header ''."""
    sections: list[tuple[str, str]] = []
    matches = list(_HEADER.finditer(text))
    start = 0
    name = ""
    for match in matches:
        body = text[start : match.start()]
        if name or body.strip():
            sections.append((name, _clean(body)))
        name = " ".join(match.group(1).upper().split())
        start = match.end()
    body = text[start:]
    if name or body.strip():
        sections.append((name, _clean(body)))
    return sections


def extract_findings_impression(text: str) -> tuple[str, str]:
    """Returns (findings, impression); both '' for an empty report."""
    sections = [(name, body) for name, body in split_sections(text) if body]
    findings = [body for name, body in sections if name in _FINDINGS_NAMES]
    impression = [body for name, body in sections if name in _IMPRESSION_NAMES]
    combined = [body for name, body in sections if "FINDING" in name and "IMPRESSION" in name]
    if combined and not findings and not impression:
        return combined[0], ""
    if not findings and not impression:
        return "", sections[-1][1] if sections else ""
    return " ".join(findings), " ".join(impression)


def join_report(findings: str, impression: str) -> str:
    """`report` = findings then impression, whichever exist."""
    return " ".join(part for part in (findings, impression) if part)
