"""Write a benchmark's generated section into docs/results.md.

Each benchmark owns one section, delimited by ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; the
text around the sections (the reading of the results) is written by hand and left alone.
"""

from pathlib import Path

RESULTS_MD = Path(__file__).parent.parent / "docs" / "results.md"


def write_section(name: str, markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace section ``name`` of ``path`` with ``markdown`` (appended at the end if the section is new)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
