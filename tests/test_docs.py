"""The commands README.md and docs/ show work as written: every `python3 train.py ...` parses
(its options exist and fit together), and every run folder and figure a `python3 -m figures ...`
line names is committed, so that each number the documents quote can be printed again; the
Python they show runs; and every link between them reaches its file and heading."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from cli import options
from conftest import ROOT

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
PLACEHOLDERS = {"MODEL": "adgm", "M": "adgm", "SETUP": "ours", "SEED": "0", "RUN": "runs/x"}  # as prose writes them


def commands(path):
    """(line, argv) of every train.py and figures command in the file: the lines of its bash blocks,
    continuations joined and VAR=value set earlier in the file substituted, and the inline `...`."""
    text, found, variables = (ROOT / path).read_text(), [], {}
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if re.fullmatch(r"[A-Z]\w*=\S+", line):
                name, value = line.split("=", 1)
                variables[name] = value
            for name, value in variables.items():
                line = line.replace("$" + name, value)
            found.append(line)
    found += re.findall(r"(?<!`)`(python3 [^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return [(line, shlex.split(line)[1:]) for line in found if line.startswith(("python3 train.py", "python3 -m figures"))
            and "$" not in line]  # a shell loop's variable: the loop is the command


COMMANDS = [(path, line, argv) for path in DOCUMENTS for line, argv in commands(path)]


def test_every_documented_train_command_parses():
    wrong = []
    for path, line, argv in COMMANDS:
        if argv[0] == "train.py" and argv[1:] != ["--help"]:
            try:
                options.parse_args([PLACEHOLDERS.get(a, a) for a in argv[1:]])
            except (options.UserError, SystemExit) as e:
                wrong.append(f"{path}: {line}: {e}")
    assert not wrong, "\n".join(wrong)


def test_every_run_and_figure_a_documented_figures_command_names_is_committed():
    missing = []
    for path, line, argv in COMMANDS:
        for arg in argv[2:] if argv[0] == "-m" else ():
            if "=" in arg and not arg.startswith("-") and not arg.endswith("=RUN"):
                missing += [f"{path}: {run}/metrics.csv" for run in arg.split("=", 1)[1].split(",")
                            if not (ROOT / run / "metrics.csv").is_file()]
            elif arg.endswith(".png") and not (ROOT / arg).is_file():
                missing.append(f"{path}: {arg}")
    assert not missing, "not committed: " + ", ".join(missing)


def test_the_documents_show_commands():
    """The collection above finds the commands: both kinds, in README and in docs/."""
    train = [path for path, line, _ in COMMANDS if line.startswith("python3 train.py")]
    figures = [path for path, line, _ in COMMANDS if line.startswith("python3 -m figures")]
    assert "README.md" in train and len(train) > 50 and len(figures) > 40, (len(train), len(figures))


def test_the_python_in_the_documents_runs_as_written(tmp_path):
    """Each ```python block of docs/ runs in a fresh interpreter with the repository importable;
    the porting example's model learns (the half-moons' chance is 50 %)."""
    blocks = [(path, block) for path in DOCUMENTS for block in re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)]
    assert blocks
    for path, block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"})
        assert done.returncode == 0, f"{path}:\n{done.stderr}"
        if "test error" in block:
            assert float(re.fullmatch(r"test error (\d+\.\d)%\n", done.stdout)[1]) < 30, done.stdout


@functools.lru_cache(maxsize=None)
def anchors(path):
    """The #fragments of a Markdown file's headings, as GitHub makes them: lower case, punctuation
    dropped, spaces as hyphens, a repeated heading numbered -1, -2, ..."""
    seen, found = {}, set()
    text = re.sub(r"```.*?```", "", (ROOT / path).read_text(), flags=re.S)
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_link_between_the_documents_reaches_its_file_and_heading():
    """A link [text](path#heading) in README.md or docs/ names a committed file, and a heading of it."""
    broken, checked = [], 0
    for path in DOCUMENTS:
        text = re.sub(r"```.*?```", "", (ROOT / path).read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            checked += 1
            file, _, fragment = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not (ROOT / linked).exists():
                broken.append(f"{path}: {target} (no {linked})")
            elif fragment and fragment not in anchors(linked):
                broken.append(f"{path}: {target} (no such heading in {linked})")
    assert not broken, "\n".join(broken)
    assert checked > 50, checked  # the pattern finds the links
