"""The documentation's relative links resolve, and the README stays short.

Every relative markdown link `[text](path)`, `[text](path#anchor)` and `[text](#anchor)` of
README.md, docs/*.md, benchmarks/README.md and checkpoints/*/README.md must name a file or
folder that exists and, where it has an anchor into a markdown file, a heading of that file
under GitHub's slug rules. http(s) and mailto links are not checked (tests never need the
network).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the text may hold brackets-free markup and line breaks.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
_EXTERNAL = ("http://", "https://", "mailto:")


def documentation_files() -> list[Path]:
    """The markdown files whose links are checked."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "checkpoints").glob("*/README.md"))
    return [path for path in files if path.is_file()]


def _without_code(text: str) -> str:
    """`text` without fenced code blocks; inline code spans keep a placeholder word (a link's
    text may hold code, a code span is never a link)."""
    return _CODE_SPAN.sub("code", _FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text: markup dropped, lower-case, every character
    but letters, digits, spaces, '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors of a markdown file's headings; repeated slugs get -1, -2, ... as on GitHub."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'FILE: (target) why' for each relative link of `path` (a file under `root`) that does
    not resolve."""
    problems = []
    for target in _LINK.findall(_without_code(path.read_text())):
        if not target or target.startswith(_EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        shown = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
        if not resolved.exists():
            problems.append(f"{where} no such file {shown}")
        elif anchor and resolved.suffix == ".md" and (
                anchor not in heading_anchors(resolved.read_text())):
            problems.append(f"{where} no heading with anchor #{anchor} in {shown}")
    return problems


def test_github_slug_rules():
    assert github_slug("The reference's commands") == "the-references-commands"
    assert github_slug("`capsules/ops.py`: routing in `tf.while_loop`") == (
        "capsulesopspy-routing-in-tfwhile_loop")
    assert github_slug("Mixed precision (`--mixed_bfloat16`)") == "mixed-precision---mixed_bfloat16"
    assert github_slug("See [Data](docs/data.md) now") == "see-data-now"
    assert heading_anchors("# A\n\n## A\n\n```bash\n# A\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_broken_links_are_found(tmp_path):
    tmp_path = tmp_path.resolve()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Two words\n")
    readme = tmp_path / "README.md"
    readme.write_text("# Top\n\n[ok](docs/page.md#two-words) [ok](#top) [web](https://x.org/y)\n"
                      "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
                      "[gone](docs/none.md) [bad](docs/page.md#two) [self](#nowhere)\n")
    assert broken_links(readme, tmp_path) == [
        "README.md: (docs/none.md) no such file docs/none.md",
        "README.md: (docs/page.md#two) no heading with anchor #two in docs/page.md",
        "README.md: (#nowhere) no heading with anchor #nowhere in README.md",
    ]


def test_documentation_links_resolve():
    files = documentation_files()
    assert ROOT / "README.md" in files
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, f"{len(problems)} broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail to docs/")
