"""Code style the reviewers would otherwise check by hand: every Python line of the project at most 120
characters (the width the code is written to), and the README's links to its own sections resolve."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["dcm", "benchmarks", "tests", "inference", "train_global_roi", "train_local_roi", "docker"]
MAX_LINE = 120


def test_python_lines_fit_the_width():
    long = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if len(line) > MAX_LINE:
                    long.append(f"{path.relative_to(ROOT)}:{number} ({len(line)} characters)")
    assert not long, "lines over 120 characters:\n" + "\n".join(long)


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than ``-`` and ``_`` dropped,
    spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_to_its_own_sections_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_github_anchor(line.lstrip("#")))
    links = set(re.findall(r"\]\(#([^)\s]+)\)", text))
    assert links and not links - anchors, f"README links to missing sections: {sorted(links - anchors)}"
