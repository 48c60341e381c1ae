"""Every document a shipped file names (a ``*.md`` path in code, docs, configs, tests or CI) is in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["README.md", "pyproject.toml", ".ci/run", "docs", "fastmim", "kernels", "benchmarks", "configs", "tests"]
SUFFIXES = {".py", ".md", ".toml", ".sh", ""}  # "" : .ci/run
# A ``*.md`` name, alone or as a path (into a folder, or up with ``..``), not the tail of a longer name or path.
MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b")
OUTPUTS = {"summary.md"}  # written by benchmarks/gpu_suite.sh into its output folder: a file it makes, not a citation


def shipped_files(root: Path) -> list[Path]:
    found = []
    for name in SHIPPED:
        path = root / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        found += [p for p in candidates if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return found


def missing_citations(root: Path) -> list[str]:
    """``file: name`` for every ``*.md`` name that resolves to no file inside ``root`` (from the root, or from the
    naming file's folder)."""
    root = root.resolve()
    missing = []
    for path in shipped_files(root):
        for name in sorted(set(MD_NAME.findall(path.read_text(errors="replace")))):
            targets = [(base / name).resolve() for base in (root, path.parent)]
            if Path(name).name in OUTPUTS or any(t.is_relative_to(root) and t.is_file() for t in targets):
                continue
            missing.append(f"{path.relative_to(root)}: {name}")
    return missing


def test_every_cited_document_is_shipped():
    assert missing_citations(ROOT) == [], "cite only documents the repository ships (README.md, docs/, benchmarks/)"


def test_the_scan_finds_a_document_that_is_not_shipped(tmp_path):
    def md(stem: str) -> str:  # names built here, so that this file names no missing document itself
        return stem + ".md"

    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / md("notes")).write_text(f"see {md('method')} (no such file) and {md('notes')} (this one)")
    (tmp_path / md("outside")).write_text("a document outside the repository")
    (root / "README.md").write_text(f"docs/{md('notes')}; {md('GONE')}; ../{md('outside')}; {md('summary')}")
    assert missing_citations(root) == [
        f"README.md: ../{md('outside')}",
        f"README.md: {md('GONE')}",
        f"docs/{md('notes')}: {md('method')}",
    ]
