"""The docs cannot drift from the CLI.

Every fenced block tagged ```sh offline in README.md and docs/*.md is run: each page's blocks in order, with
`bash -e`, in one fresh temporary folder per page (`rsg` is this checkout's, run by a warm forking server:
tests/_warm_rsg.py;
`configs/` and `tests/fixtures/` linked in as in a clone; a private RSG_DATA_DIR, XDG_CACHE_HOME and HF_HOME;
HF_HUB_OFFLINE=1). Commands that need a GPU, the hub or minutes go in untagged ```sh blocks.
Also: every relative link in those pages points at an existing file (and heading), and README.md stays a front page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK_PAGES = DOC_PAGES + [p for p in (REPO / "submissions" / "README.md", REPO / "reports" / "README.md")
                          if p.exists()]
README_MAX_LINES = 160
# The two commands a newcomer types word for word (.ci/run runs the second one).
SETUP_CMD = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e ".[test]" '
             '&& .venv/bin/rsg zeroshot --model tiny --data sample')
TEST_CMD = ".venv/bin/python -m pytest -q -n 2"

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


def fenced_blocks(text: str, spans: list[range] | None = None) -> list[tuple[str, str, int]]:
    """(info string, body, 1-based line of the opening fence) of every top-level fenced block; `spans` gets each
    block's 1-based line numbers, fences included."""
    out: list[tuple[str, str, int]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i].lstrip(" ")) if len(lines[i]) - len(lines[i].lstrip(" ")) < 4 else None
        if not m:
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].strip(), i
        body: list[str] = []
        i += 1
        while i < len(lines):
            s = lines[i].strip()
            if s.startswith(fence[0] * len(fence)) and not s.strip(fence[0]):
                break
            body.append(lines[i])
            i += 1
        # An indented block (inside a list item) is dedented by its fence's indentation.
        indent = len(lines[start]) - len(lines[start].lstrip(" "))
        out.append((info, "\n".join(b[indent:] if b[:indent].isspace() else b for b in body), start + 1))
        if spans is not None:
            spans.append(range(start + 1, i + 2))
        i += 1
    return out


def offline_blocks(page: Path) -> list[tuple[str, int]]:
    return [(body, line) for info, body, line in fenced_blocks(page.read_text(encoding="utf-8"))
            if info.split() == ["sh", "offline"]]


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


PAGES_WITH_COMMANDS = [p for p in DOC_PAGES if offline_blocks(p)]


def test_fence_parser() -> None:
    text = "a\n```sh offline\nrsg x\n```\n\n  ```sh\n  rsg y\n  ```\n````text\n```\nz\n````\n"
    assert fenced_blocks(text) == [("sh offline", "rsg x", 2), ("sh", "rsg y", 6), ("text", "```\nz", 9)]


def test_every_part_has_a_page_with_tested_commands() -> None:
    names = {p.name for p in PAGES_WITH_COMMANDS}
    for page in ("README.md", "data.md", "zeroshot.md", "models.md", "finetune.md", "hmtl.md", "corpus.md",
                 "reports.md", "benchmarks.md", "bad-input.md"):
        assert page in names, f"{page} has no ```sh offline block"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=_rel)
def test_offline_commands_run(page: Path, tmp_path: Path, warm_rsg: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    (work / "tests").mkdir()
    (work / "tests" / "fixtures").symlink_to(REPO / "tests" / "fixtures", target_is_directory=True)
    env = dict(os.environ)
    env.update({
        # `rsg` is the warm forking client (tests/_warm_rsg.py): each command is still its own process running
        # this checkout's entry point, without paying the torch import again; then the venv's bin/.
        "PATH": f"{warm_rsg}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RSG_DATA_DIR": str(tmp_path / "rsg-data"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    for body, line in offline_blocks(page):
        missing = _missing_extra(body)
        if missing:  # a block for an optional extra (`# needs: peft`): it runs where the extra is installed
            continue
        proc = subprocess.run(["bash", "-e", "-c", body], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{_rel(page)}:{line}: the block exited {proc.returncode}\n--- block\n{body}\n"
                        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")


def _missing_extra(body: str) -> str | None:
    """The first module a block's leading `# needs: a, b` line names that is not importable here, else None."""
    import importlib.util

    first = body.lstrip().splitlines()[0] if body.strip() else ""
    if not first.startswith("# needs:"):
        return None
    for name in (n.strip() for n in first.removeprefix("# needs:").split(",")):
        if name and importlib.util.find_spec(name) is None:
            return name
    return None


def test_blocks_for_extras_name_their_modules() -> None:
    assert _missing_extra("# needs: json\nrsg x") is None
    assert _missing_extra("# needs: json, no_such_module_xyz\nrsg x") == "no_such_module_xyz"
    assert _missing_extra("rsg x") is None


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def fenced_lines(text: str) -> set[int]:
    spans: list[range] = []
    fenced_blocks(text, spans)
    return {n for r in spans for n in r}


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    fenced = fenced_lines(text)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for n, ln in enumerate(text.split("\n"), 1):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", ln)
        if m and n not in fenced:
            s = github_slug(m[1])
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    fenced = fenced_lines(text)
    out = []
    for n, ln in enumerate(text.split("\n"), 1):
        if n in fenced:
            continue
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", ln)):
            out.append((n, target))
    return out


def test_github_slug() -> None:
    assert github_slug("Reproducing the paper's 20-epoch regime on FRED-T5-1.7B") == \
        "reproducing-the-papers-20-epoch-regime-on-fred-t5-17b"
    assert github_slug("Zero-shot scoring: `rsg bench zeroshot`") == "zero-shot-scoring-rsg-bench-zeroshot"


@pytest.mark.parametrize("page", LINK_PAGES, ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    bad = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{_rel(page)}:{line}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{_rel(page)}:{line}: {target}: no heading '#{anchor}' in {dest.name}")
    assert not bad, "\n".join(bad)


def test_link_checker_sees_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    (tmp_path / "q.md").write_text("# Title\n## A `code` part\n", encoding="utf-8")
    page.write_text("[ok](q.md#a-code-part) [gone](nope.md) [bad](q.md#nope) `[no](inline.md)`\n"
                    "```\n[no](fenced.md)\n```\n", encoding="utf-8")
    assert links(page) == [(1, "q.md#a-code-part"), (1, "nope.md"), (1, "q.md#nope")]
    assert anchors(tmp_path / "q.md") == {"title", "a-code-part"}


def test_readme_is_a_front_page() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    shown = [body.strip() for info, body, _ in fenced_blocks(text) if info.split()[:1] == ["sh"]]
    assert SETUP_CMD in shown, "README must show the set-up + main job command word for word"
    assert TEST_CMD in shown, "README must show the test command word for word"
    assert TEST_CMD in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link {page.name}"


def test_docs_pages_start_with_their_commands() -> None:
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        first_section = min((m.start() for m in re.finditer(r"^## ", text, re.M)), default=len(text))
        assert re.search(r"^```sh", text[:first_section], re.M), f"{page.name}: no commands before its first section"


@pytest.mark.parametrize("name", ["corpus.md", "hmtl.md"])
def test_trial_outputs_of_the_corpus_and_hmtl_pages_are_git_ignored(name: str) -> None:
    """Issue 23 item 7: run in a checkout, the documented trial commands must not leave untracked folders."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    page = REPO / "docs" / name
    outs = [m.group(1) for body, _ in offline_blocks(page) for m in re.finditer(r"--out\s+(\S+)", body)]
    assert outs, f"{name}: no --out in its offline blocks"
    for out in outs:
        probe = f"{out.rstrip('/')}/probe.json"
        rc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode
        assert rc == 0, f"docs/{name}: `--out {out}` writes into the checkout where git does not ignore it"
