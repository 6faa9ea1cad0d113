"""Rendering a report's sections: markdown (figures as relative links) and one self-contained HTML page (CSS
inline, figures as base64 `data:` URIs, links only within the page; nothing is fetched from anywhere).

A section is a title and blocks: a paragraph (a str; `**bold**` and `code` inline; lines starting "- " are a
list), a Table, a Figure (a PNG file) or Verbatim text.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: bool = True  # HTML: right-align the cells that hold numbers


@dataclass
class Figure:
    path: Path  # a PNG file, linked from the markdown, embedded in the HTML
    caption: str


@dataclass
class Verbatim:
    text: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph; **bold** and `code` inline), Table, Figure, Verbatim


def to_markdown(sections: list[Section], title: str, base: str | Path) -> str:
    """The report as markdown; figures linked relative to `base` (the report's folder)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
                lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                lines += [f"![{block.caption}]({Path(os.path.relpath(block.path, base)).as_posix()})", "",
                          f"*{block.caption}*"]
            elif isinstance(block, Verbatim):
                lines += ["```", block.text, "```"]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1140px; margin: 0 auto; padding: 1.5em 2em 4em; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
nav { font-size: .95em; } nav a { margin-right: 1em; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #d0d7de; padding: .35em .75em; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: .9em; white-space: nowrap; }
/* a name, path, command or fingerprint is one unit: never split, at a hyphen or a slash either */
pre { background: #f6f8fa; padding: .8em 1em; border-radius: 6px; font-size: .95em; }
figure { margin: 1.2em 0; } img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9em; margin-top: .3em; }
ul { padding-left: 1.4em; }
"""
NUMBER = re.compile(r"^[+\-−]?[\d,.]+( %| / \d+)?$|^n/a$|^—$")


def inline_html(text: str) -> str:
    """Escape `text` for HTML, then `**bold**` -> <strong>, `code` -> <code>."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def data_uri(path: str | Path) -> str:
    """A PNG file as a `data:image/png;base64,...` URI (the HTML page embeds its figures)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def to_html(sections: list[Section], title: str) -> str:
    """The report as one self-contained HTML page: inline CSS, figures as data URIs, links only within the page."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections) + "</nav>"]
    for section in sections:
        out.append(f'<h2 id="{anchor(section.title)}">{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in block.header)
                           + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f'<td class="num">{inline_html(c)}</td>' if block.numeric and NUMBER.match(c)
                                         else f"<td>{inline_html(c)}</td>" for c in row) + "</tr>"
                        for row in block.rows]
                out.append("</tbody></table>")
            elif isinstance(block, Figure):
                out.append(f'<figure><img src="{data_uri(block.path)}" alt="{html.escape(block.caption)}">'
                           f"<figcaption>{inline_html(block.caption)}</figcaption></figure>")
            elif isinstance(block, Verbatim):
                out.append(f"<pre>{html.escape(block.text)}</pre>")
            elif block.startswith("- "):
                out.append("<ul>" + "".join(f"<li>{inline_html(item[2:])}</li>" for item in block.split("\n"))
                           + "</ul>")
            else:
                out.append(f"<p>{inline_html(block)}</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
