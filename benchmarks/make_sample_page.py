"""Draw the bundled sample page: an A4 report page at 144 dpi (1191 x 1684 px).

Deterministic (no randomness, Pillow's bundled font only), so re-running it reproduces
the committed PNG. Usage: python3 benchmarks/make_sample_page.py [output.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1191, 1684  # A4 (210 x 297 mm) at 144 dpi
MARGIN_X, MARGIN_TOP, MARGIN_BOTTOM = 118, 110, 120
INK = (24, 24, 24)
GREY = (110, 110, 110)
RULE = (60, 60, 60)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/llm_perf_opt/models/assets/sample_page.png"

HEADER = "Riverside Municipal Water Utility  |  Annual Performance Report 2024"
TITLE = "Annual Performance Review of Water Supply and Treatment Operations"
SUBTITLE = "Prepared by the Office of Infrastructure Planning, March 2025"

SECTIONS: list[tuple[str, list[str]]] = [
    (
        "1. Summary",
        [
            "During 2024 the utility delivered 41.8 million cubic metres of treated water to "
            "approximately 212,000 residential and commercial customers, an increase of 2.6 percent "
            "over the previous year. Demand growth was concentrated in the northern service area, "
            "where two new housing developments were connected in the second quarter. Average daily "
            "production peaked at 148,000 cubic metres during the July heat wave, which remained "
            "well within the combined capacity of the Eastfield and Millbrook treatment plants.",
            "Water quality targets were met in all twelve months. A total of 18,420 samples were "
            "analysed by the accredited laboratory, and only three results exceeded the internal "
            "alert thresholds for turbidity. Each exceedance was traced to maintenance work on the "
            "distribution network and was resolved within forty-eight hours of detection.",
        ],
    ),
    (
        "2. Operating Results",
        [
            "Non-revenue water, the share of production that is lost to leaks, metering errors or "
            "unbilled use, fell from 17.9 to 15.4 percent. The improvement follows the replacement of "
            "31 kilometres of cast-iron mains and the installation of pressure-reducing valves in five "
            "district metered areas. Energy consumption per cubic metre delivered declined by 4.1 "
            "percent, mainly because the new variable-speed pumps at the Millbrook intake allow the "
            "station to follow demand instead of cycling on and off.",
            "Table 1 compares the main performance indicators for the last three reporting years. "
            "Figures for 2022 and 2023 have been restated to reflect the revised customer count "
            "adopted after the billing system migration.",
        ],
    ),
]

TABLE_CAPTION = "Table 1. Key performance indicators, 2022-2024"
TABLE_NOTE = (
    "Source: utility operating records. Values for 2022 and 2023 restated after the billing migration."
)
TABLE = [
    ["Indicator", "Unit", "2022", "2023", "2024"],
    ["Water delivered", "million cu. m", "39.6", "40.7", "41.8"],
    ["Customers served", "thousand", "204.3", "207.9", "212.1"],
    ["Non-revenue water", "%", "18.6", "17.9", "15.4"],
    ["Mains replaced", "km", "22", "26", "31"],
    ["Energy intensity", "kWh per cu. m", "0.412", "0.398", "0.382"],
    ["Service interruptions", "per 1,000 conn.", "3.8", "3.5", "2.9"],
]
COLUMN_WIDTHS = [347, 230, 126, 126, 126]  # sums to the text width, 955 px

CLOSING = (
    "3. Outlook",
    [
        "The capital programme for 2025 focuses on the second phase of the main replacement "
        "project and on a new reservoir for the northern service area. The board has approved a "
        "budget of 46 million for these works, to be financed from operating surplus and a "
        "long-term loan. Staff will report progress on leakage reduction to the committee each "
        "quarter.",
    ],
)


def font(size: int) -> ImageFont.FreeTypeFont:
    loaded = ImageFont.load_default(size=size)
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        sys.exit("this Pillow has no FreeType support; cannot draw a scalable font")
    return loaded


def wrap(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=face) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


class Page:
    """A cursor that lays out blocks from the top margin down and refuses to overflow."""

    def __init__(self) -> None:
        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.y = MARGIN_TOP
        self.text_width = WIDTH - 2 * MARGIN_X

    def advance(self, pixels: int) -> None:
        self.y += pixels
        if self.y > HEIGHT - MARGIN_BOTTOM:
            sys.exit("page content overflows the bottom margin; shorten the text")

    def text(
        self, text: str, face: ImageFont.FreeTypeFont, leading: int, bold: bool = False, fill=INK
    ) -> None:
        # The bundled font has no bold face; a 1 px stroke in the ink colour stands in for it.
        stroke = 1 if bold else 0
        for line in wrap(self.draw, text, face, self.text_width):
            self.draw.text(
                (MARGIN_X, self.y), line, font=face, fill=fill, stroke_width=stroke, stroke_fill=fill
            )
            self.advance(leading)

    def rule(self, width: int = 1) -> None:
        self.draw.line([(MARGIN_X, self.y), (WIDTH - MARGIN_X, self.y)], fill=RULE, width=width)

    def table(self, rows: list[list[str]], face: ImageFont.FreeTypeFont, row_height: int) -> None:
        top, x_edges = self.y, [MARGIN_X]
        for width in COLUMN_WIDTHS:
            x_edges.append(x_edges[-1] + width)
        self.draw.rectangle([x_edges[0], top, x_edges[-1], top + row_height], fill=(236, 236, 236))
        for r, row in enumerate(rows):
            y = top + r * row_height
            for c, cell in enumerate(row):
                # Numbers right-aligned as in a typeset report, labels left-aligned.
                if c >= 2:
                    x = x_edges[c + 1] - 12 - self.draw.textlength(cell, font=face)
                else:
                    x = x_edges[c] + 12
                self.draw.text(
                    (x, y + 7), cell, font=face, fill=INK, stroke_width=1 if r == 0 else 0, stroke_fill=INK
                )
        bottom = top + len(rows) * row_height
        for r in range(len(rows) + 1):
            y = top + r * row_height
            self.draw.line(
                [(x_edges[0], y), (x_edges[-1], y)], fill=RULE, width=2 if r in (0, 1, len(rows)) else 1
            )
        for x in x_edges:
            self.draw.line([(x, top), (x, bottom)], fill=RULE, width=1)
        self.advance(bottom - top)


def make_page() -> Image.Image:
    body, small, heading, title = font(20), font(17), font(26), font(36)
    page = Page()
    page.text(HEADER, small, 26, fill=GREY)
    page.rule()
    page.advance(44)
    page.text(TITLE, title, 48, bold=True)
    page.advance(4)
    page.text(SUBTITLE, body, 30, fill=GREY)
    page.advance(26)
    for heading_text, paragraphs in [*SECTIONS, CLOSING]:
        page.text(heading_text, heading, 40, bold=True)
        page.advance(4)
        for paragraph in paragraphs:
            page.text(paragraph, body, 29)
            page.advance(14)
        if heading_text.startswith("2."):
            page.advance(6)
            page.text(TABLE_CAPTION, body, 34)
            page.table(TABLE, body, 40)
            page.advance(10)
            page.text(TABLE_NOTE, small, 24, fill=GREY)
            page.advance(12)
        page.advance(16)
    page.y = HEIGHT - MARGIN_BOTTOM + 30
    page.rule()
    page.draw.text((WIDTH / 2, page.y + 14), "- 3 -", font=small, fill=GREY, anchor="mt")
    return page.image


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    make_page().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
