"""README's equation table points at the lines of code that compute each equation, and its layout paragraph names
every module and benchmark; this keeps both true.

    python tests/test_readme.py --fix     # rewrite the line numbers after the code moved
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<eq>Eq\.[^|]+) \| `(?P<code>.+)` \| \[(?P<name>[\w.]+):(?P<line>\d+)\]\((?P<path>[^#)]+)#L\d+\) \|$")


def rows(text: str):
    return [m for m in map(ROW.match, text.splitlines()) if m]


def actual_line(m) -> int | None:
    lines = (ROOT / m["path"]).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if line.strip() == m["code"]]
    return hits[0] if len(hits) == 1 else None


def test_every_equation_row_points_at_its_code():
    found = rows((ROOT / "README.md").read_text())
    assert len(found) >= 12  # every equation of the paper has a row
    for m in found:
        assert actual_line(m) == int(m["line"]), f"{m['eq'].strip()}: `{m['code']}` is at line {actual_line(m)} " \
                                                 f"of {m['path']} (README says {m['line']}; python {__file__} --fix)"


def test_the_layout_names_every_module_and_benchmark():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("Layout: "):text.index("CI entry")]
    files = [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "src" / "carlrar").rglob("*.py")]
    missing = [str(f.relative_to(ROOT)) for f in files if f.name != "__init__.py" and f.name not in layout]
    assert not missing, f"README's layout paragraph does not name {missing}"


def fix():
    readme = ROOT / "README.md"
    text = readme.read_text()
    for m in rows(text):
        line = actual_line(m)
        if line is None:
            sys.exit(f"{m['code']!r} is not one unique line of {m['path']}")
        fixed = m[0].replace(f"{m['name']}:{m['line']}]", f"{m['name']}:{line}]").replace(f"#L{m['line']})", f"#L{line})")
        text = text.replace(m[0], fixed)
    readme.write_text(text)


if __name__ == "__main__" and "--fix" in sys.argv:
    fix()
