"""The report's sections as one self-contained HTML page (charts inline as base64 PNG, CSS inline, no URLs) and as
markdown. Every piece of text is escaped: model answers and data file contents are untrusted."""

from __future__ import annotations

import base64
from html import escape

from medtune.charts import Chart
from medtune.reporting.document import Heading, Section, Text
from medtune.reporting.tables import Table

CSS = """
:root { --ink:#1f2430; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f6f8fb; --accent:#4c72b0;
        --good:#1d7a3e; --good-bg:#e6f4ea; --bad:#b3261e; --bad-bg:#fce8e6; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.5; font-size:15px;
       font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC",
                    "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.02rem; margin: 22px 0 8px; color: var(--muted); }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:20px 24px; margin:18px 0;
          box-shadow: 0 1px 2px rgba(20,30,50,.04); }
nav { display:flex; flex-wrap:wrap; gap:6px 16px; margin:10px 0 0; font-size:.92rem; }
nav a { color: var(--accent); text-decoration:none; }
nav a:hover { text-decoration: underline; }
p.note { color: var(--muted); font-size: .92rem; }
.warning { background:#fff4e5; border:1px solid #f0b35a; border-left:6px solid #e08a00; border-radius:8px;
           padding:12px 16px; font-weight:600; color:#6b3d00; }
.table-wrap { overflow-x:auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: .9rem; min-width: 50%; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align:left; vertical-align: top; }
th { background: #eef2f8; font-weight: 600; white-space: nowrap; position: sticky; top: 0; }
tbody tr:nth-child(even) td { background: #fafbfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.better { color: var(--good); background: var(--good-bg) !important; }
td.worse { color: var(--bad); background: var(--bad-bg) !important; }
td.multiline { white-space: pre-line; }
figure { display: inline-block; vertical-align: top; margin: 10px 18px 18px 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color: var(--muted); font-size: .88rem; margin-top: 4px; }
ol.legend { columns: 2; font-size: .88rem; color: var(--ink); margin: 6px 0 0; }
"""


def to_html(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in sections)
    body = "\n".join(_html_section(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n<header><h1>{escape(title)}</h1><nav>{nav}</nav></header>\n"
            f"{body}\n</main>\n</body>\n</html>\n")


def _html_section(section: Section) -> str:
    blocks = "\n".join(_html_block(b) for b in section.blocks)
    return f'<section id="{escape(section.id)}">\n<h2>{escape(section.title)}</h2>\n{blocks}\n</section>'


def _html_block(block) -> str:
    if isinstance(block, Text):
        if block.style == "warning":
            return f'<p class="warning" role="alert">{escape(block.text)}</p>'
        return f'<p class="{escape(block.style)}">{escape(block.text)}</p>'
    if isinstance(block, Heading):
        return f"<h3>{escape(block.text)}</h3>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Chart):
        return _html_chart(block)
    raise TypeError(f"no HTML for {type(block).__name__}")


def _html_table(table: Table) -> str:
    head = "".join(f'<th{_num(table, c)}>{escape(h)}</th>' for c, h in enumerate(table.headers))
    rows = []
    for r, row in enumerate(table.rows):
        cells = []
        for c, cell in enumerate(row):
            classes = [k for k in ("num" if c in table.numeric else "", table.tones.get((r, c), ""),
                                   "multiline" if "\n" in cell else "") if k]
            attribute = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attribute}>{escape(cell)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _num(table: Table, column: int) -> str:
    return ' class="num"' if column in table.numeric else ""


def _html_chart(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    legend = ""
    if chart.legend:  # names the chart could only number (no CJK font where it was drawn)
        items = "".join(f'<li value="{escape(number)}">{escape(name)}</li>' for number, name in chart.legend)
        legend = f'<ol class="legend">{items}</ol>'
    caption = f"<figcaption>{escape(chart.caption)}</figcaption>" if chart.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{escape(chart.title)}">{caption}{legend}</figure>'



def to_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {_md_text(title)}", "", "Charts are in report.html next to this file.", ""]
    for section in sections:
        lines += [f"## {_md_text(section.title)}", ""]
        for block in section.blocks:
            lines += [*_md_block(block), ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block) -> list[str]:
    if isinstance(block, Text):
        text = _md_text(block.text)
        return [f"> **Warning:** {text}" if block.style == "warning" else f"_{text}_" if block.style == "note" else text]
    if isinstance(block, Heading):
        return [f"### {_md_text(block.text)}"]
    if isinstance(block, Table):
        separator = ["---:" if c in block.numeric else "---" for c in range(len(block.headers))]
        return [_md_row(block.headers), _md_row(separator, escaped=False), *(_md_row(r) for r in block.rows)]
    return []  # charts live in the HTML only


def _md_row(cells: list[str], escaped: bool = True) -> str:
    shown = [_md_cell(c) for c in cells] if escaped else cells
    return "| " + " | ".join(shown) + " |"


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", "<br>")


def _md_text(text: str) -> str:
    # markdown passes raw HTML through; entities keep an untrusted '<script>' inert in any renderer
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
