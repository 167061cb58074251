"""Collect the shell commands that README.md and docs/*.md show a user, so tests/system/test_docs_commands.py can run them.

What counts as a command (the rules the docs are written to):

- **Shell code blocks** (```` ```bash ````, ```` ```sh ````, ```` ```shell ````): every line is a command, after
  joining `\\` continuations and dropping comments (a `#` that starts a word outside quotes). A compound statement
  (`for ... do ... done`, `if ... fi`, `while`, `case`) is one command however many lines it spans. A line that uses a
  shell variable set by an earlier line of the same block (`jid=$(sbatch ...)` then `... $jid ...`) is run after
  those lines (its `prelude`); it is still keyed by its own text.
- **Console blocks** (```` ```console ````): only lines starting with a `$ ` prompt (the rest is output).
- **Unlabelled blocks** (```` ``` ````): only lines that start with a known program (below); the rest of such blocks
  is diagrams and directory layouts.
- **Inline code** (in table cells and in prose, a span may wrap across lines): every `backtick span` that starts
  with a known program, except a bare subcommand name (`dedistill submit`, `dedistill data convert`: that names a
  command, it does not show one to type). Fragments and synopses in prose are collected too, so the mapping table
  must say what they are.

Known programs: `dedistill`, `make`, `torchrun`, `sbatch`, `srun`, `tensorboard`, `pytest`, and `python`/`python3`
followed by `-m MODULE` or a `.py` path.

A command is identified by its text (continuations joined, whitespace collapsed, comments dropped); the same text
in several places is one command with several locations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", "docs/*.md")
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}
KNOWN = re.compile(r"^(dedistill|make|torchrun|sbatch|srun|tensorboard|pytest)(\s|$)|^python3?\s+(-m\s+\S|\S+\.py\b)")
# `dedistill`, `dedistill submit`, `dedistill data convert`: how the docs name a subcommand, not a command to type
NAME_ONLY = re.compile(r"^(dedistill(\s+[a-z][a-z-]*){0,2}|make|torchrun|sbatch|srun|tensorboard|pytest)$")
FENCE = re.compile(r"^\s*```\s*([A-Za-z0-9_+-]*)\s*$")
OPENERS = {"for": "done", "while": "done", "until": "done", "if": "fi", "case": "esac"}
# tokens after which the next word is a command (or a keyword) again
_COMMAND_BEFORE = {";", "&&", "||", "|", "&", "(", ")", "do", "then", "else", "elif", "if", "while", "until", "!", "{"}


@dataclass
class DocCommand:
    text: str
    """The command as the key of the mapping table: one line, comments dropped, whitespace collapsed."""
    locations: list[str] = field(default_factory=list)
    """`file:line` of every place it is shown (the first line of a continued command)."""
    prelude: list[str] = field(default_factory=list)
    """Earlier lines of its block that set shell variables it uses."""


def strip_comment(line: str) -> str:
    """Drop a shell comment: `#` starting a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def normalize(text: str) -> str:
    return " ".join(text.split())


def _compound_depth(text: str) -> int:
    # Keywords count only in command position: `--until vae` is an argument, not an `until` loop.
    depth, command_position = 0, True
    unquoted = re.sub(r"'[^']*'|\"(\\.|[^\"\\])*\"", " ", text)
    for tok in re.findall(r"&&|\|\||[;&|()]|[^\s;&|()]+", unquoted):
        if command_position and tok in OPENERS:
            depth += 1
        elif command_position and tok in OPENERS.values():
            depth -= 1
        command_position = tok in _COMMAND_BEFORE
    return depth


def _block_commands(lines: list[tuple[int, str]], lang: str) -> list[tuple[int, str]]:
    """(line number, command text) for one fenced block's body."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for lineno, raw in lines:
        line = raw
        if lang == "console":
            if not pending:
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
        line = strip_comment(line)
        if not pending:
            start = lineno
            if not line.strip():
                continue
            if lang == "" and not KNOWN.match(line):  # indented lines are diagrams
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if _compound_depth(pending) > 0:
            pending += " " if pending.rstrip().endswith(("do", "then", ";", "&", "|", "{")) else "; "
            continue
        out.append((start, normalize(pending)))
        pending = ""
    if pending.strip():
        out.append((start, normalize(pending)))
    return out


def _assigned(cmd: str) -> set[str]:
    return set(re.findall(r"(?:^|;\s*)([A-Za-z_][A-Za-z0-9_]*)=", cmd))


def _used(cmd: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", cmd))


def _inline_commands(prose: list[tuple[int, str]], rel: str) -> list[tuple[str, int, str, list[str]]]:
    """Backtick spans outside fenced blocks. A table row is its own unit; in prose a span may wrap to the next line."""
    found = []
    para: list[tuple[int, str]] = []

    def flush():
        text = "\n".join(line for _, line in para)
        for m in re.finditer(r"`([^`]+)`", text):
            span = normalize(m.group(1).replace("\\|", "|"))
            if KNOWN.match(span) and not NAME_ONLY.match(span):
                found.append((rel, para[0][0] + text[: m.start()].count("\n"), span, []))
        para.clear()

    for lineno, line in prose:
        if line.lstrip().startswith("|") or not line.strip():
            flush()
            if line.strip():
                para.append((lineno, line))
                flush()
            continue
        para.append((lineno, line))
    flush()
    return found


def collect_file(path: Path, rel: str) -> list[tuple[str, int, str, list[str]]]:
    """(rel file, line, command, prelude) in document order."""
    found = []
    prose: list[tuple[int, str]] = []  # lines outside fenced blocks (tables included)
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            lang = m.group(1).lower()
            body = []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                body.append((i + 1, lines[i]))
                i += 1
            if lang in SHELL_LANGS or lang in ("console", ""):
                cmds = _block_commands(body, "console" if lang == "console" else ("" if lang == "" else "sh"))
                seen: list[str] = []
                for lineno, cmd in cmds:
                    prelude = [c for c in seen if _assigned(c) & _used(cmd)]
                    found.append((rel, lineno, cmd, prelude))
                    seen.append(cmd)
            i += 1
            prose.append((i, ""))
            continue
        prose.append((i + 1, lines[i]))
        i += 1
    found.extend(_inline_commands(prose, rel))
    return found


def collect(repo: Path = REPO) -> list[DocCommand]:
    by_text: dict[str, DocCommand] = {}
    files = sorted({p for pattern in DOC_FILES for p in repo.glob(pattern)})
    for path in files:
        rel = path.relative_to(repo).as_posix()
        for f, lineno, text, prelude in collect_file(path, rel):
            cmd = by_text.setdefault(text, DocCommand(text=text, prelude=prelude))
            if f"{f}:{lineno}" not in cmd.locations:
                cmd.locations.append(f"{f}:{lineno}")
    return list(by_text.values())


if __name__ == "__main__":  # python tests/doc_commands.py: list what the docs show
    for c in collect():
        print(f"{', '.join(c.locations):40s} {c.text}" + (f"   [after: {'; '.join(c.prelude)}]" if c.prelude else ""))
