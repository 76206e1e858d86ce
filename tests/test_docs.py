"""The docs cannot go stale: every example in README.md and docs/*.md runs, the site builds with
`mkdocs build --strict`, and examples/quickstart.ipynb executes.

How a page's examples run (docs/development.md says the same for writers):
- Every fenced block names its language. `console`: `$ command` lines, each followed by what it prints;
  `bash` / `sh`: commands only; `python`: run; `pycon`: `>>>` examples whose shown output is checked as a
  doctest. `text`, `toml`, `json`, `csv` are not examples (TOML is checked to parse).
- The blocks of one page run in document order in a fresh temporary folder that holds `demo-out/`, the
  folder `make demo` writes (`kdprobe study demo`: 3 scratch and 3 label-KD ResNets on the embedded digits
  data), made once per session; the Python blocks of a page share one namespace.
- `kdprobe ...` runs in-process (typer's CliRunner on cli.main.app), with the words split and globs
  expanded as bash does (an unquoted pattern that matches nothing stays as typed); `VAR=value` prefixes
  set the environment for the command, `| filter` pipes its output through bash, `a && b` and `for x in
  ...; do ...; done` work; other commands run in bash.
- Shown output is compared line by line (trailing spaces ignored): `...` inside a line matches any text,
  a line holding only `...` matches any number of lines. A command whose shown output starts with
  `error:` must fail (exit 1); every other command must succeed.
- A block directly below a paragraph that starts with "Printed on" shows numbers of trained weights, which
  differ between machines: its commands run and must succeed or fail as shown, and the output must match
  with every number masked (same lines, same words, other digits).
- A block directly below a paragraph that starts with "Not run by the tests:" is skipped (or directly
  above one, where no block follows the note), and only such a block. The note says why (a GPU, a
  download, the test suite itself).
"""
from __future__ import annotations

import contextlib
import doctest
import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "Not run by the tests:"
MACHINE_MARK = "Printed on"
SHELL = {"console", "bash", "sh", "shell"}
RUN = SHELL | {"python", "pycon"}
NOT_EXAMPLES = {"text", "toml", "json", "csv"}
#: commands a page may show but the tests must not run: the block needs a visible SKIP_MARK note
NEVER_RUN = {"make", "torchrun", "pip", "pip3", "apt-get", "sudo", "git", "jupyter", "mkdocs"}


# ---------------------------------------------------------------- reading the pages
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None  # the visible reason, when marked
    machine: bool = False  # output depends on the machine: compared with numbers masked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _marker(par: list[str]) -> str:
    """The first line of a paragraph without markdown emphasis or quote marks."""
    return par[0].strip().strip(">*_ ").strip() if par else ""


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, spans, i = [], [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        body = "\n".join(ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines[i + 1:j])
        lang = info.split()[0].lower() if info else ""
        blocks.append(Block(page, i + 1, lang, body + "\n"))
        spans.append((i, j))
        i = j + 1

    def paragraph(start: int, step: int) -> tuple[list[str], int]:
        """The paragraph next to a block (skipping blank lines) and the index of its far end."""
        k = start
        while 0 <= k < len(lines) and not lines[k].strip():
            k += step
        par = []
        while 0 <= k < len(lines) and lines[k].strip() and not lines[k].lstrip().startswith("```"):
            par.append(lines[k])
            k += step
        return (par if step > 0 else par[::-1]), k

    for n, (block, (a, b)) in enumerate(zip(blocks, spans)):
        above, _ = paragraph(a - 1, -1)
        below, end = paragraph(b + 1, +1)
        if _marker(above).startswith(SKIP_MARK):
            block.skip = _marker(above)
        if _marker(below).startswith(SKIP_MARK):
            # a note right above a block is that block's; below a block only when no block follows it
            nxt = spans[n + 1][0] if n + 1 < len(spans) else None
            if nxt is None or any(ln.strip() for ln in lines[end:nxt]):
                block.skip = _marker(below)
        block.machine = _marker(above).startswith(MACHINE_MARK)
        if not block.lang:
            raise AssertionError(f"{block.where}: a code block without a language; name it (console, bash, "
                                 f"python, pycon, text, toml, ...) so that the tests know whether it runs")
    return blocks


# ---------------------------------------------------------------- a small shell
@dataclass
class Word:
    text: str
    glob: bool = False  # holds an unquoted * ? or [


def split_words(line: str, env: dict[str, str]) -> list[Word | str]:
    """bash's word splitting for the subset the docs use: quotes, backslashes, $VAR / ${VAR}, comments;
    operators | && ; come back as plain strings."""
    out: list[Word | str] = []
    cur, glob_chars, have, quote = [], False, False, None
    i = 0

    def var(k: int) -> tuple[str, int]:
        m = re.match(r"\$(?:\{(\w+)\}|(\w+))", line[k:])
        if not m:
            return "$", k + 1
        name = m.group(1) or m.group(2)
        return env.get(name, os.environ.get(name, "")), k + m.end()

    def flush():
        nonlocal cur, glob_chars, have
        if have:
            out.append(Word("".join(cur), glob_chars))
        cur, glob_chars, have = [], False, False

    while i < len(line):
        c = line[i]
        if quote == "'":
            if c == "'":
                quote = None
            else:
                cur.append(c)
            i += 1
        elif quote == '"':
            if c == '"':
                quote = None
                i += 1
            elif c == "\\" and i + 1 < len(line) and line[i + 1] in '"\\$`':
                cur.append(line[i + 1])
                i += 2
            elif c == "$":
                v, i = var(i)
                cur.append(v)
            else:
                cur.append(c)
                i += 1
        elif c in "'\"":
            quote, have = c, True
            i += 1
        elif c == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            have = True
            i += 2
        elif c.isspace():
            flush()
            i += 1
        elif c == "#" and not have:
            break
        elif line.startswith("&&", i):
            flush()
            out.append("&&")
            i += 2
        elif c in "|;":
            flush()
            out.append(c)
            i += 1
        elif c in "<>`(" or line.startswith("$(", i):
            raise AssertionError(f"the docs' shell runs no redirection, subshell or command substitution "
                                 f"in a kdprobe command: {line!r}")
        elif c == "$":
            v, i = var(i)
            cur.append(v)
            have = True
        else:
            if c in "*?[":
                glob_chars = True
            cur.append(c)
            have = True
            i += 1
    if quote:
        raise AssertionError(f"unclosed quote in {line!r}")
    flush()
    return out


def expand(words: list[Word], cwd: Path) -> list[str]:
    args = []
    for w in words:
        hits = sorted(glob.glob(w.text, root_dir=cwd)) if w.glob else []
        args.extend(hits or [w.text])
    return args


@dataclass
class Shell:
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # loop variables

    def run(self, line: str) -> tuple[int, str]:
        """Run one logical command line; returns (exit status, output as the user sees it)."""
        first = line.split()[0] if line.split() else ""
        if first == "for":
            raise AssertionError("a for loop belongs in a bash block")
        status, output = 0, ""
        for chain in self._and_chains(line):
            status, text = self._pipeline(chain)
            output += clean_output(text) + "\n"
            if status != 0:
                break
        return status, output.strip("\n")

    def _and_chains(self, line: str) -> list[str]:
        # split on top-level && and ; (outside quotes); a failing part stops the rest, as under `set -e`
        parts, cur, quote, i = [], "", None, 0
        while i < len(line):
            c = line[i]
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"":
                quote = c
            elif line.startswith("&&", i) or c == ";":
                parts.append(cur)
                cur = ""
                i += 2 if c == "&" else 1
                continue
            cur += c
            i += 1
        parts.append(cur)
        return [p.strip() for p in parts if p.strip()]

    def _pipeline(self, text: str) -> tuple[int, str]:
        m = re.match(r"\s*(?:[A-Za-z_]\w*=\S*\s+)*(\S+)", text)
        program = m.group(1) if m else ""
        if program in NEVER_RUN:
            raise AssertionError(f"`{program}` cannot run inside the tests; mark the block with a visible "
                                 f"'{SKIP_MARK} <why>' note")
        if program != "kdprobe":
            return self._bash(text, "")
        words = split_words(text, self.env)
        head = []
        for w in words:
            if w == "|":
                break
            head.append(w)
        assignments = {}
        while head and isinstance(head[0], Word) and re.fullmatch(r"[A-Za-z_]\w*=.*", head[0].text):
            k, v = head.pop(0).text.split("=", 1)
            assignments[k] = v
        status, output = self._kdprobe(expand(head[1:], self.cwd), assignments)
        if "|" in [w for w in words if isinstance(w, str)]:
            # the text after the first unquoted | goes to bash, with the command's output on its stdin
            status2, output = self._bash(self._after_first_pipe(text), output)
            status = status or status2
        return status, output

    @staticmethod
    def _after_first_pipe(text: str) -> str:
        quote = None
        for i, c in enumerate(text):
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"":
                quote = c
            elif c == "|":
                return text[i + 1:]
        raise AssertionError(text)

    def _bash(self, script: str, stdin: str) -> tuple[int, str]:
        env = {**os.environ, **self.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        p = subprocess.run(["bash", "-c", script], cwd=self.cwd, input=stdin, capture_output=True, text=True,
                           env=env, timeout=300)
        return p.returncode, p.stdout + p.stderr

    def _kdprobe(self, args: list[str], env: dict[str, str]) -> tuple[int, str]:
        from typer.testing import CliRunner

        from cli.main import app

        saved = {k: os.environ.get(k) for k in env}
        old = os.getcwd()
        os.environ.update(env)
        os.chdir(self.cwd)
        try:
            r = CliRunner().invoke(app, args, prog_name="kdprobe")
        finally:
            os.chdir(old)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            raise AssertionError(f"kdprobe {' '.join(args)} raised:\n"
                                 + "".join(traceback.format_exception(*r.exc_info)))
        return r.exit_code, clean_output(r.output)


#: one drawing of a tqdm bar: "eval:  33%|###   | 1/3 [00:00<00:00,  5.69ckpt/s]"
PROGRESS = re.compile(r"[^\r\n|]*\d+%\|[^|\r\n]*\|[^\[\r\n]*\[[^\]\r\n]*\]")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # nested bars move the cursor


def clean_output(text: str) -> str:
    """The output as the pages show it: progress bars left out (tqdm redraws them with \\r)."""
    lines = []
    for ln in text.replace("\r\n", "\n").split("\n"):
        drawn = bool(PROGRESS.search(ln)) or "\r" in ln or "\x1b" in ln
        parts = [p for p in PROGRESS.sub("", ANSI.sub("", ln)).split("\r") if p.strip()]
        if parts or not drawn:
            lines.append(parts[-1].rstrip() if parts else "")
    return "\n".join(lines).strip("\n")


# ---------------------------------------------------------------- shown vs printed output
NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*|\.\d+)(?:e[-+]?\d+)?\*?|\bnan\b|\binf\b")


def masked(text: str) -> str:
    """Numbers of trained weights differ between machines: the same words with every number replaced."""
    text = NUMBER.sub("#", text)
    text = re.sub(r"-{2,}", "-", text)  # table rules follow the column widths
    return "\n".join(re.sub(r"\s+", " ", ln).strip() for ln in text.split("\n"))


def output_matches(shown: str, printed: str, machine: bool) -> bool:
    shown_lines = [ln.rstrip() for ln in shown.strip("\n").split("\n")] if shown.strip() else []
    printed = printed.strip("\n")
    if machine:
        shown_lines = masked("\n".join(shown_lines)).split("\n") if shown_lines else []
        printed = masked(printed)
    pattern = []
    for ln in shown_lines:
        if ln.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            parts = ln.split("...")  # spaces next to an elision are part of it (table columns shift)
            parts = [p.rstrip() if k == 0 else p.lstrip() if k == len(parts) - 1 else p.strip()
                     for k, p in enumerate(parts)] if len(parts) > 1 else parts
            pattern.append(".*?".join(re.escape(part) for part in parts) + r"[ \t]*\n")
    return re.fullmatch("".join(pattern), printed + "\n" if printed else "") is not None


# ---------------------------------------------------------------- running a page
def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line offset, command) with backslash continuations joined."""
    out, buf, start = [], "", 0
    for n, ln in enumerate(text.split("\n")):
        if not buf:
            start = n
        if ln.endswith("\\"):
            buf += ln[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            out.append((start, buf))
        buf = ""
    return out


def run_bash_block(block: Block, shell: Shell) -> None:
    lines = logical_lines(block.text)
    i = 0
    while i < len(lines):
        off, line = lines[i]
        m = re.match(r"^\s*for\s+(\w+)\s+in\s+(.+?);\s*do\s*$", line)
        if m:
            depth, body, i = 1, [], i + 1
            while i < len(lines):
                if re.match(r"^\s*done\s*(#.*)?$", lines[i][1]):
                    depth -= 1
                    if depth == 0:
                        break
                if re.match(r"^\s*for\s", lines[i][1]):
                    depth += 1
                body.append(lines[i])
                i += 1
            assert depth == 0, f"{block.where}: `for` without `done`"
            for value in [w.text for w in split_words(m.group(2), shell.env) if isinstance(w, Word)]:
                shell.env[m.group(1)] = value
                for boff, bline in body:
                    run_one(block, shell, block.line + 1 + boff, bline, None)
            shell.env.pop(m.group(1), None)
        elif re.match(r"^\s*(#.*)?$", line):
            pass
        else:
            run_one(block, shell, block.line + 1 + off, line, None)
        i += 1


def run_console_block(block: Block, shell: Shell) -> None:
    text_lines = block.text.rstrip("\n").split("\n")
    i = 0
    while i < len(text_lines):
        ln = text_lines[i]
        if not ln.startswith("$ "):
            raise AssertionError(f"{block.where}: a console block starts each command with '$ ' "
                                 f"(line {block.line + 1 + i}: {ln!r})")
        cmd, start = ln[2:], i
        while cmd.endswith("\\") and i + 1 < len(text_lines):
            i += 1
            cmd = cmd[:-1] + " " + text_lines[i].strip()
        i += 1
        shown = []
        while i < len(text_lines) and not text_lines[i].startswith("$ "):
            shown.append(text_lines[i])
            i += 1
        run_one(block, shell, block.line + 1 + start, cmd, "\n".join(shown),
                (block.line + 1 + start + (i - start - len(shown)), len(shown)))


#: KDPROBE_DOCS_UPDATE=1 (while writing docs only) writes what a command printed into the page where it
#: differs, instead of failing (=exact: numbers of 'Printed on' blocks too): check the diff, and put `...`
#: back where a path or hash varies
UPDATES: list[tuple[Path, int, int, str]] = []


def run_one(block: Block, shell: Shell, line_no: int, cmd: str, shown: str | None,
            span: tuple[int, int] | None = None) -> None:
    where = f"{block.page.relative_to(ROOT)}:{line_no}"
    if cmd.strip().startswith("cd "):
        target = split_words(cmd.strip()[3:], shell.env)[0].text
        shell.cwd = (shell.cwd / target).resolve()
        return
    status, printed = shell.run(cmd)
    update = os.environ.get("KDPROBE_DOCS_UPDATE")  # "exact": also rewrite numbers of 'Printed on' blocks
    if update and span and not output_matches(shown, printed, block.machine and update != "exact"):
        for d in sorted({str(shell.cwd), str(ROOT), os.environ.get("KDPROBE_DOCS_DEMO", "/-")}, key=len)[::-1]:
            printed = printed.replace(str(Path(d).parent) if d.endswith("demo-out") else d, "...")
        UPDATES.append((block.page, span[0], span[1], printed))
        return
    expect_error = shown is not None and any(ln.startswith("error:") for ln in shown.split("\n"))
    if expect_error and status == 0:
        raise AssertionError(f"{where}: `{cmd}` should fail as shown, but exited 0:\n{printed}")
    if not expect_error and status != 0:
        raise AssertionError(f"{where}: `{cmd}` exited {status}:\n{printed}")
    if shown is not None and not output_matches(shown, printed, block.machine):
        how = " (numbers masked: the block is marked 'Printed on ...')" if block.machine else ""
        raise AssertionError(f"{where}: `{cmd}` printed other output than the page shows{how}.\n"
                             f"--- shown\n{shown}\n--- printed\n{printed}")


def run_python_block(block: Block, namespace: dict, cwd: Path) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        if block.lang == "pycon":
            test = doctest.DocTestParser().get_doctest(block.text, namespace, block.where, str(block.page),
                                                       block.line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            report = []
            runner.run(test, out=report.append, clear_globs=False)
            namespace.update(test.globs)  # DocTest ran on a copy: later blocks see its names
            if runner.failures:
                raise AssertionError(f"{block.where}: shown output differs:\n" + "".join(report))
        else:
            code = compile(block.text, block.where, "exec")
            exec(code, namespace)
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> Path:
    """What `make demo` writes (its study, `kdprobe study demo`), made once for every page and the notebook."""
    if os.environ.get("KDPROBE_DOCS_DEMO"):  # while writing docs: reuse a demo-out made earlier by this code
        return Path(os.environ["KDPROBE_DOCS_DEMO"]).resolve()
    where = tmp_path_factory.mktemp("docs-demo")
    status, output = Shell(where).run("kdprobe study demo --out demo-out --quiet")
    assert status == 0, output
    return where / "demo-out"


@pytest.fixture(scope="session")
def digits_rgb(tmp_path_factory) -> Path:
    """digits-rgb/: the digits as a 32x32 RGB image folder, 30 training and 5 test images per class, made
    exactly as docs/checkpoints.md shows (the pages that use it link there)."""
    from PIL import Image

    import kdprobe

    root = tmp_path_factory.mktemp("docs-rgb") / "digits-rgb"
    digits = kdprobe.load_dataset("digits")
    for split, per_class in (("train", 30), ("test", 5)):
        images, labels = digits.split(split)
        for c in digits.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        seen = {}
        for img, label in zip(images, labels.tolist()):
            c = digits.classes[label]
            seen[c] = seen.get(c, 0) + 1
            if seen[c] <= per_class:
                Image.fromarray(img[0].numpy()).convert("RGB").resize((32, 32)).save(root / split / c / f"{seen[c]}.png")
    return root


@pytest.fixture
def workspace(tmp_path, demo_out, digits_rgb) -> Path:
    """A fresh folder with what every page starts from: demo-out/ and digits-rgb/."""
    shutil.copytree(demo_out, tmp_path / "demo-out")
    shutil.copytree(digits_rgb, tmp_path / "digits-rgb")
    return tmp_path


def page_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_every_block_names_a_known_language():
    langs = {}
    for page in PAGES:
        for b in read_blocks(page):
            langs.setdefault(b.lang, []).append(b.where)
    unknown = {k: v for k, v in langs.items() if k not in RUN | NOT_EXAMPLES}
    assert not unknown, f"code blocks in languages the tests neither run nor know: {unknown}"


def test_toml_blocks_parse():
    for page in PAGES:
        for b in read_blocks(page):
            if b.lang == "toml":
                try:
                    tomllib.loads(b.text)
                except tomllib.TOMLDecodeError as e:
                    raise AssertionError(f"{b.where}: {e}") from None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_examples_run(page, workspace):
    blocks = [b for b in read_blocks(page) if b.lang in RUN and not b.skip]
    if not blocks:
        pytest.skip("no examples on this page")
    cwd = workspace
    shell, namespace = Shell(cwd), {"__name__": "__docs__"}
    try:
        for b in blocks:
            if b.lang in SHELL:
                (run_console_block if b.lang == "console" else run_bash_block)(b, shell)
            else:
                run_python_block(b, namespace, shell.cwd)
    finally:
        _apply_updates(page)


def _apply_updates(page: Path) -> None:
    mine = sorted((u for u in UPDATES if u[0] == page), key=lambda u: -u[1])
    if not mine:
        return
    lines = page.read_text(encoding="utf-8").split("\n")
    for _, first, count, printed in mine:  # first: 1-based line of the first shown line
        indent = re.match(r"\s*", lines[first - 2]).group(0)
        lines[first - 1:first - 1 + count] = [indent + ln if ln else ln for ln in printed.split("\n")]
    page.write_text("\n".join(lines), encoding="utf-8")
    UPDATES[:] = [u for u in UPDATES if u[0] != page]


# ---------------------------------------------------------------- the site and the notebook
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()


NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _kernel_spec(where: Path) -> str:
    """A kernel spec that runs this interpreter (the venv's python), whatever other specs the machine has."""
    import json

    name = "kdprobe-tests"
    d = where / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kdprobe tests", "language": "python"}))
    return name


def test_quickstart_notebook_is_committed_with_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs or not c.source.strip() for c in code), "run the notebook before committing it"
    counts = [c.execution_count for c in code if c.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), f"cells ran out of order: {counts}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_quickstart_notebook_executes(tmp_path, workspace, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cwd = workspace
    (cwd / "examples").mkdir()
    jupyter = tmp_path / ".jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    name = _kernel_spec(jupyter)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=name, timeout=600,
                                     resources={"metadata": {"path": str(cwd / "examples")}})
    with contextlib.chdir(cwd / "examples"):
        client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
