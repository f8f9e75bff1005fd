"""What README.md and docs/DESIGN.md show a reader to type, checked against the code, so that a
renamed flag, a removed verb or a renamed function fails here and not in a reader's terminal.

- Every `lmlab ...` command, a line of a fenced block or an inline code span, parses with lmlab's
  own parser (lmlab.cli.build_parser); nothing runs.
- Every `python benchmarks/X.py ...` names a script whose own parse_args accepts its arguments.
- Every ```python block compiles, and every lmlab name it imports or uses exists; so does every
  `lmlab.x.y` that an inline span names, and every flag that prose names alone (`--min-lr`).
- README's test command is the one .ci/run runs.

How the docs' text becomes argument lists (doc_commands):
- A ```bash block holds shell lines (an unlabelled one too, in its lines that look like
  commands: looks_like_command): `\\` continues a line, `#` starts a comment, `&&`, `||`, `;`
  and `|` separate commands, and a redirection goes with its file.
- An inline span uses synopsis notation: `[--json]` is optional (checked with and without it),
  `a|b` is one of them (each checked), and a table row's `\\|` is its `|`.
- Launchers go: `NAME=value`, `env -u NAME`, `mpiexec -n N -env NAME VALUE`; `python -m lmlab` is
  `lmlab`.
- Placeholders (RUN, OUT, SPEC) are words like any other and parse as such. Arguments a doc leaves
  out are allowed where it says so: `...` stands for them, and an inline span in prose names a
  command and the flags the sentence is about (`lmlab import --block-size 64`). Such a partial
  command may lack a required argument; every verb, flag and value it does give must parse.
- The few that cannot parse at all are in UNPARSEABLE, each with its reason.

The checks are pure functions of the docs' text, so test_*_fails below feed them broken copies
of the real docs (a renamed flag, verb, function or test command) to show that each one fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

from benchmark_scripts import BENCHMARKS, load_script
from lmlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/DESIGN.md")

# Commands written with a placeholder where the parser needs a real word, by their text in the doc.
UNPARSEABLE = {
    "mpiexec -n N lmlab VERB": "VERB stands for any of the verbs that run under MPI",
}

# Flags the prose names that are not lmlab's, whose they are.
OTHER_FLAGS = {
    "--mb": "benchmarks/tokenize_stream.py's (its commands are checked as commands)",
    "-march": "the compiler's",
    "-ffast-math": "the compiler's",
}

SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
# The launchers' options that take values (how many), so that the command after them is found; an
# option not listed here is an error, not a guess.
LAUNCHER_OPTIONS = {
    "env": {"-u": 1, "--unset": 1, "-i": 0},
    "mpiexec": {"-n": 1, "-np": 1, "-f": 1, "--hostfile": 1, "-hostfile": 1, "-hosts": 1,
                "-ppn": 1, "-env": 2, "-genv": 2, "-x": 1},
}
LAUNCHER_OPTIONS["mpirun"] = LAUNCHER_OPTIONS["mpiexec"]
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>", "<&", ">|"}
ELIDED = "..."
# How a command line starts, for unlabelled blocks (looks_like_command).
COMMAND_STARTS = ("lmlab", "env", "mpiexec", "mpirun", "python", "python3", "pip", "pytest")
MISSING_ARGUMENTS = "error: the following arguments are required"


@dataclass(frozen=True)
class DocCommand:
    where: str                  # "README.md:64": where the failure message sends a reader
    source: str                 # the command as the doc writes it
    words: Tuple[str, ...]      # the arguments: after `lmlab`, or after the benchmarks/ script
    script: Optional[str]       # "mpi_scaling" for `python benchmarks/mpi_scaling.py`, else None
    partial: bool               # arguments may be left out: `...`, or an inline span


@dataclass(frozen=True)
class Fence:
    line: int                   # the line of its first code line
    language: str
    code: str


def split_markdown(text: str) -> Tuple[List[Fence], str]:
    """The fenced blocks, and the prose with every fenced line blanked (line numbers kept)."""
    fences, prose, language, start, code = [], [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if language is None:
                language, start, code = line.strip().strip("`").strip(), number + 1, []
            else:
                fences.append(Fence(start, language, "\n".join(code)))
                language = None
            prose.append("")
        elif language is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return fences, "\n".join(prose)


def inline_spans(prose: str) -> Iterator[Tuple[int, str]]:
    """(line, text) of each inline code span; one wrapped over lines is one line of text."""
    lines = prose.splitlines()
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        if re.search(r"\n\s*\n", match.group(1)):  # spans no paragraph break: an unpaired `
            continue
        line = prose.count("\n", 0, match.start()) + 1
        span = " ".join(match.group(1).split())
        if lines[line - 1].lstrip().startswith("|"):  # a table cell escapes its |
            span = span.replace("\\|", "|")
        yield line, span


def shell_lines(code: str) -> Iterator[Tuple[int, str]]:
    """(offset, line) of each logical line of a shell block, continuations joined."""
    pending, first = "", 0
    for offset, line in enumerate(code.splitlines()):
        if not pending:
            first = offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def shell_commands(line: str) -> List[List[str]]:
    """The simple commands of one shell line, as argument lists: comments dropped, split at
    &&, ||, ; and |, each redirection dropped with its file (and the descriptor before it)."""
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)  # "2>&1": the descriptor is not an argument
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, redirected = [], [], False
    for word in lexer:
        if redirected:
            redirected = False
        elif word in REDIRECTIONS:
            redirected = True
        elif word in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(word)
    return [words for words in commands + [words] if words]


def synopsis_variants(span: str) -> List[str]:
    """The commands an inline span's notation stands for: `[x]` with and without x, `a|b` each."""
    optional = re.search(r"\[([^\[\]]*)\]", span)
    if optional:
        before, after = span[:optional.start()], span[optional.end():]
        return (synopsis_variants(before + optional.group(1) + after)
                + synopsis_variants(" ".join((before + after).split())))
    choice = re.search(r"(?<!\S)([^\s|]+(?:\|[^\s|]+)+)(?!\S)", span)
    if choice:
        return [variant for alternative in choice.group(1).split("|")
                for variant in synopsis_variants(span[:choice.start()] + alternative
                                                 + span[choice.end():])]
    return [span]


def program_words(words: Sequence[str]) -> List[str]:
    """The words from the program on: launchers and variable assignments before it go."""
    words = list(words)
    while words:
        if re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        elif words[0] in LAUNCHER_OPTIONS:
            launcher, options, words = words[0], LAUNCHER_OPTIONS[words[0]], words[1:]
            while words and words[0].startswith("-"):
                if words[0] not in options:
                    raise ValueError(f"{launcher} {words[0]}: an option this test does not know "
                                     "(add it to LAUNCHER_OPTIONS with its number of values)")
                words = words[1 + options[words[0]]:]
        elif words[0] in ("python", "python3") and words[1:3] == ["-m", "lmlab"]:
            words = ["lmlab"] + words[3:]
        else:
            return words
    return words


def as_command(words: Sequence[str], where: str, source: str, inline: bool
               ) -> Optional[DocCommand]:
    """The command if words run lmlab or a benchmarks/ script, else None (pip, cmake, ...)."""
    words = program_words(words)
    if inline and len(words) < 2:  # `lmlab` alone names the program, not a command
        return None
    partial = inline or ELIDED in words
    arguments = tuple(word for word in words if word != ELIDED)
    if words and words[0] == "lmlab":
        return DocCommand(where, source, arguments[1:], None, partial)
    script = re.fullmatch(r"benchmarks/(\w+)\.py", words[1]) if len(words) > 1 else None
    if words and words[0] in ("python", "python3") and script:
        return DocCommand(where, source, arguments[2:], script.group(1), partial)
    return None


def looks_like_command(line: str) -> bool:
    """Whether a line of an unlabelled block is a command, not a line of a layout or a diagram
    ("lmlab library      demo_descent, ..."): it starts as one does, and is not two columns (a
    name, a run of spaces, its description); spaces before a # comment are a command's."""
    code = line.split("#")[0].strip()
    return (re.match(rf"([A-Za-z_]\w*=\S*\s+)*({'|'.join(COMMAND_STARTS)})(\s|$)", code) is not None
            and not re.search(r"\S {2,}\S", code))


def doc_commands(text: str, doc: str) -> List[DocCommand]:
    """Every lmlab and benchmarks/ command of a markdown text, in the order it shows them."""
    fences, prose = split_markdown(text)
    commands = []
    for fence in fences:
        if fence.language not in SHELL_LANGUAGES:
            continue
        for offset, line in shell_lines(fence.code):
            if not fence.language and not looks_like_command(line):
                continue
            where = f"{doc}:{fence.line + offset}"
            for words in shell_commands(line):
                commands.append(as_command(words, where, line.strip(), inline=False))
    for line, span in inline_spans(prose):
        for variant in synopsis_variants(span):
            try:
                words = shell_commands(variant)
            except ValueError:  # unbalanced quotes: prose, not a command
                continue
            for command_words in words:
                commands.append(as_command(command_words, f"{doc}:{line}", span, inline=True))
    return [command for command in commands if command is not None]


@functools.lru_cache(maxsize=None)
def lmlab_parser() -> argparse.ArgumentParser:
    return build_parser()


def parse_error(parse: Callable[[List[str]], object], words: Sequence[str]) -> Optional[str]:
    """The error line argparse gives for words (it prints it and exits), or None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse(list(words))
    except SystemExit as exc:
        if exc.code:  # --help and --version exit 0
            lines = stderr.getvalue().strip().splitlines()
            return lines[-1] if lines else f"exit {exc.code}"
    return None


def unknown_flags(parser: argparse.ArgumentParser, words: Sequence[str]) -> List[str]:
    """The flags among words that their command does not take. Only for partial commands:
    argparse stops at a missing argument before it refuses an unknown flag."""
    unknown = []
    for word in words:
        commands = [action.choices for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction)]
        if commands and word in commands[0]:
            parser = commands[0][word]
        elif word.startswith("-") and not re.fullmatch(r"-[\d.]+", word):
            if word.split("=")[0] not in parser._option_string_actions:
                unknown.append(word)
    return unknown


def command_problem(command: DocCommand, parse: Callable[[List[str]], object],
                    parser: Optional[argparse.ArgumentParser] = None) -> Optional[str]:
    """Why the command does not parse, or None. parser: the parser behind parse, where known, to
    check a partial command's flags."""
    error = parse_error(parse, command.words)
    if not (error and command.partial and MISSING_ARGUMENTS in error):
        return error
    unknown = unknown_flags(parser, command.words) if parser is not None else []
    return f"unrecognized arguments: {' '.join(unknown)}" if unknown else None


def lmlab_problem(command: DocCommand) -> Optional[str]:
    return command_problem(command, lmlab_parser().parse_args, lmlab_parser())


def prose_flags(text: str) -> Iterator[Tuple[int, str]]:
    """(line, flag) of each flag an inline span of prose starts with or lists: `--min-lr`,
    `--tokenizer char|bpe`, `--n-layer/--n-head`."""
    _, prose = split_markdown(text)
    for line, span in inline_spans(prose):
        if span.startswith("-"):
            for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", span):
                yield line, flag


def every_flag(parser: argparse.ArgumentParser) -> set:
    """The flags of a parser and of all its sub-commands."""
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                flags |= every_flag(command)
    return flags


def unknown_prose_flags(text: str, doc: str) -> List[str]:
    """The flags prose names that no lmlab command takes (and that OTHER_FLAGS does not list)."""
    known = every_flag(lmlab_parser()) | set(OTHER_FLAGS)
    return [f"{doc}:{line}: {flag}" for line, flag in prose_flags(text) if flag not in known]


def python_names(code: str) -> List[str]:
    """Every dotted lmlab name the code imports or uses: "lmlab.sample.generate", "lmlab.load"."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.insert(0, node.attr)
                node = node.value
            if isinstance(node, ast.Name):
                names.append(".".join([node.id] + parts))
    return sorted({name for name in names if name.split(".")[0] == "lmlab"})


def resolves(dotted: str) -> bool:
    """Whether the dotted name is an object of the real package (a submodule is imported)."""
    parts = dotted.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], 2):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
        return False
    return True


def python_problems(code: str) -> List[str]:
    """What is wrong with a Python example: a syntax error, or lmlab names that do not exist."""
    try:
        compile(code, "<doc>", "exec")
    except SyntaxError as exc:
        return [f"line {exc.lineno}: {exc.msg}"]
    return [f"{name}: no such name" for name in python_names(code) if not resolves(name)]


def python_examples(text: str, doc: str) -> List[Tuple[str, str]]:
    """(where, code) of each ```python block and each inline span that is a Python expression
    starting with `lmlab.` (`lmlab.ops.round_bf16(x)`)."""
    fences, prose = split_markdown(text)
    examples = [(f"{doc}:{fence.line}", fence.code) for fence in fences
                if fence.language == "python"]
    for line, span in inline_spans(prose):
        if span.startswith("lmlab."):
            with contextlib.suppress(SyntaxError):
                ast.parse(span, mode="eval")
                examples.append((f"{doc}:{line}", span))
    return examples


def readme_test_command(readme: str) -> List[List[str]]:
    """The Quick start's "install with the test extras and run the tests": its commands."""
    fences, _ = split_markdown(readme)
    for fence in fences:
        for _, line in shell_lines(fence.code):
            commands = shell_commands(line)
            if any(words[0] == "pytest" for words in commands):
                return commands
    raise AssertionError("README shows no command that runs pytest")


def ci_commands(script: str) -> List[List[str]]:
    """The commands a CI script runs through its `run` helper, `python -m X` read as X."""
    commands = []
    for _, line in shell_lines(script):
        for words in shell_commands(line):
            words = program_words(words)
            if words[:1] == ["run"]:
                words = program_words(words[1:])
                if words[:2] in (["python", "-m"], ["$PYTHON", "-m"]):
                    words = words[2:]
                commands.append(words)
    return commands


def readme_ci_difference(readme: str, ci_run: str, ci_scripts: dict) -> Optional[str]:
    """How README's test command differs from what .ci/run runs, or None. CI's pytest may
    --ignore a test file that a script .ci/run runs (ci_scripts: name -> text) runs itself."""
    readme_commands = readme_test_command(readme)
    ci = ci_commands(ci_run)
    for words in readme_commands:
        if words[0] == "pip" and words not in ci:
            return f"README installs with {' '.join(words)!r}; .ci/run never does"
    readme_pytest = next(words for words in readme_commands if words[0] == "pytest")
    # the test suite's run: the one pytest of .ci/run naming no directory (benchmarks/ is another)
    suite = [words for words in ci if words[0] == "pytest"
             and not [w for w in words[1:] if not w.startswith("-")]]
    if len(suite) != 1:
        return f".ci/run runs the test suite {len(suite)} times, not once: {suite}"
    ignored = [w.split("=", 1)[1] for w in suite[0][1:] if w.startswith("--ignore=")]
    kept = [w for w in suite[0] if not w.startswith("--ignore=")]
    if kept != readme_pytest:
        return f"README runs {' '.join(readme_pytest)!r}, .ci/run {' '.join(suite[0])!r}"
    for path in ignored:
        if not any(re.search(rf"pytest\b.*\s{re.escape(path)}\b", text)
                   for name, text in ci_scripts.items() if f"bash {name}" in ci_run):
            return f".ci/run's pytest ignores {path}, and no script .ci/run runs tests it"
    return None


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


COMMANDS = [command for doc in DOCS for command in doc_commands(read(doc), doc)]
LMLAB_COMMANDS = [c for c in COMMANDS if c.script is None and c.source not in UNPARSEABLE]
SCRIPT_COMMANDS = [c for c in COMMANDS if c.script is not None]
PYTHON_EXAMPLES = [example for doc in DOCS for example in python_examples(read(doc), doc)]


def ids(commands):
    return [command.where for command in commands]


@pytest.mark.parametrize("command", LMLAB_COMMANDS, ids=ids(LMLAB_COMMANDS))
def test_lmlab_command_parses(command):
    problem = lmlab_problem(command)
    assert problem is None, f"{command.where}: `{command.source}`: {problem}"


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=ids(SCRIPT_COMMANDS))
def test_benchmark_command_parses(command, monkeypatch):
    script = BENCHMARKS / f"{command.script}.py"
    assert script.is_file(), f"{command.where}: `{command.source}`: no {script.relative_to(ROOT)}"
    problem = command_problem(command, load_script(command.script, monkeypatch).parse_args)
    assert problem is None, f"{command.where}: `{command.source}`: {problem}"


def test_unparseable_commands_are_few_and_still_unparseable():
    """The list stays short and true: each entry is in the docs and still fails to parse (once
    it parses, it is checked like any other and leaves the list)."""
    for source in UNPARSEABLE:
        listed = [c for c in COMMANDS if c.source == source]
        assert listed, f"{source!r} is in no doc any more: remove it from UNPARSEABLE"
        assert all(lmlab_problem(c) for c in listed), f"{source!r} parses: remove it"


def test_flags_named_in_prose_exist():
    """A flag the prose names alone (`--min-lr`, `--precision auto|fp32|bf16`) is a flag of some
    lmlab command: a reader looks for it in --help."""
    unknown = [flag for doc in DOCS for flag in unknown_prose_flags(read(doc), doc)]
    assert not unknown, f"flags no lmlab command takes: {', '.join(unknown)}"


@pytest.mark.parametrize("where, code", PYTHON_EXAMPLES, ids=[w for w, _ in PYTHON_EXAMPLES])
def test_python_example_names_exist(where, code):
    problems = python_problems(code)
    assert not problems, f"{where}: {'; '.join(problems)}"


def test_readme_test_command_is_what_ci_runs():
    scripts = {f".ci/{path.name}": path.read_text() for path in (ROOT / ".ci").iterdir()
               if path.is_file()}
    difference = readme_ci_difference(read("README.md"), read(".ci/run"), scripts)
    assert difference is None, difference


# The extraction, and every check failing on a broken copy of the docs.


def test_extraction_reads_blocks_spans_and_launchers():
    text = "\n".join([
        "Run `lmlab sample RUN --prompt \"a b\"` or `lmlab bench kernels [--json]`, not `lmlab`.",
        "| `lmlab demo loss\\|sampling` | a table cell |",
        "```bash",
        "pip install . && lmlab pretrain --steps 2 \\",
        "    --lr 0.1   # a comment",
        "mpiexec -f hosts -n 4 -env OMP_NUM_THREADS 2 lmlab doctor --mpi 2>&1 | tee log",
        "env -u OPENBLAS_CORETYPE python benchmarks/mpi_scaling.py --steps 12 > out.txt",
        "python -m lmlab chat runs/qa ...",
        "```",
        "```python",
        "import lmlab  # lmlab pretrain --not-a-command",
        "```",
    ])
    found = [(c.where, c.words, c.script, c.partial) for c in doc_commands(text, "X.md")]
    assert found == [
        ("X.md:4", ("pretrain", "--steps", "2", "--lr", "0.1"), None, False),
        ("X.md:6", ("doctor", "--mpi"), None, False),
        ("X.md:7", ("--steps", "12"), "mpi_scaling", False),
        ("X.md:8", ("chat", "runs/qa"), None, True),
        ("X.md:1", ("sample", "RUN", "--prompt", "a b"), None, True),
        ("X.md:1", ("bench", "kernels", "--json"), None, True),
        ("X.md:1", ("bench", "kernels"), None, True),
        ("X.md:2", ("demo", "loss"), None, True),
        ("X.md:2", ("demo", "sampling"), None, True),
    ]
    with pytest.raises(ValueError, match="mpiexec --bind-to"):
        doc_commands("```\nmpiexec --bind-to core lmlab doctor\n```", "X.md")


def broken_readme_problems(old: str, new: str) -> List[str]:
    """The lmlab commands holding new that fail in a copy of README with old replaced by new."""
    readme = read("README.md")
    assert old in readme, old
    commands = doc_commands(readme.replace(old, new), "README.md")
    return [c.source for c in commands
            if new.strip("`") in c.source and c.script is None and lmlab_problem(c)]


@pytest.mark.parametrize("old, new", [
    ("--sample-after 300", "--sample-afterwards 300"),      # a flag renamed, in a fenced block
    ("lmlab rlhf runs/qa", "lmlab rlfh runs/qa"),           # a verb misspelled, in the table
    ("--top-k 10 --png", "--top-k ten --png"),              # a value of the wrong type
    ("`lmlab import --block-size 64`", "`lmlab import --block 64`"),  # a partial span's flag
    ("lmlab bench kernels [--json]", "lmlab bench kernels [--jsn]"),  # an optional one
    ("`lmlab demo descent`", "`lmlab demo decent`"),        # a view of a verb, named alone
])
def test_a_broken_command_in_the_readme_fails(old, new):
    assert broken_readme_problems(old, new)
    assert broken_readme_problems(old, old) == []


def test_a_renamed_flag_in_prose_fails():
    readme = read("README.md")
    assert unknown_prose_flags(readme, "README.md") == []
    broken = readme.replace("`--min-lr` above", "`--minimum-lr` above")
    assert [problem.split(": ")[1] for problem in unknown_prose_flags(broken, "README.md")] == [
        "--minimum-lr"]


def test_a_broken_benchmark_command_fails(monkeypatch):
    command = next(c for c in SCRIPT_COMMANDS if c.script == "tokenize_stream" and c.words)
    broken = DocCommand(command.where, command.source, ("--megabytes", "1024"), command.script,
                        command.partial)
    parse = load_script(command.script, monkeypatch).parse_args
    assert command_problem(command, parse) is None
    assert "unrecognized arguments: --megabytes" in command_problem(broken, parse)


def test_a_renamed_function_in_a_python_example_fails():
    code = next(code for _, code in PYTHON_EXAMPLES if "from lmlab.sample import generate" in code)
    assert python_problems(code) == []
    assert python_problems(code.replace("import generate", "import generate_text")) == [
        "lmlab.sample.generate_text: no such name"]
    assert python_problems(code.replace("load_model(", "lmlab.checkpoint.load_modle(")) == [
        "lmlab.checkpoint.load_modle: no such name"]
    assert python_problems("import lmlab.nothing") == ["lmlab.nothing: no such name"]
    assert python_problems("x = (") != []


def test_a_different_test_command_fails():
    readme, ci_run = read("README.md"), read(".ci/run")
    scripts = {".ci/aarch64": read(".ci/aarch64")}
    assert readme_ci_difference(readme, ci_run, scripts) is None
    assert "README runs 'pytest -x'" in readme_ci_difference(
        readme.replace('".[test]" && pytest', '".[test]" && pytest -x'), ci_run, scripts)
    assert "never does" in readme_ci_difference(
        readme.replace('".[test]" && pytest', '".[tests]" && pytest'), ci_run, scripts)
    assert "no script .ci/run runs tests it" in readme_ci_difference(
        readme, ci_run, {".ci/aarch64": "echo nothing"})
