"""The documentation is true: every command shown in README.md and docs/ parses, README's Python example runs,
every relative link resolves, and README's test command is the one CI runs.

Commands are parsed, not run (they would need datasets, checkpoints or hours): `python train.py ...` and
`python sample.py ...` go through the command lines' own parsers and the config / sampler checks in this
process, so a flag that does not exist or a value out of range fails here; other scripts must exist and take
every flag shown.
"""

import ast
import fnmatch
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(lang: str):
    """(page, line number, text) of every fenced block of language `lang`."""
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                yield page, text.count("\n", 0, m.start()) + 2, m.group(2)


def _commands():
    """(id, argv) of every command line in the bash blocks: continuation lines joined, comments dropped, split
    at && ; |, leading VAR=value assignments removed."""
    out = []
    for page, first, text in _blocks("bash"):
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i and lines[i - 1].endswith("\\"):
                continue  # a continuation, joined below to the line it continues
            j = i
            while lines[j].endswith("\\"):
                j += 1
                line = line[:-1] + " " + lines[j]
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            argv: list[str] = []
            for tok in [*lexer, ";"]:
                if tok and set(tok) <= set(";&|"):
                    while argv and ENV.match(argv[0]):
                        argv.pop(0)
                    if argv:
                        out.append((f"{_rel(page)}:{first + i}: {' '.join(argv)}", argv))
                    argv = []
                else:
                    argv.append(tok)
    return out


COMMANDS = _commands()


def _python_command(argv):
    """(what, args) for a `python ...` command: ("train"|"sample"|"export"|"pytest"|"script"|"skip", args)."""
    if not Path(argv[0]).name.startswith("python") or len(argv) < 2:
        return "skip", []
    if argv[1] in ("train.py", "sample.py"):
        return argv[1][:-3], argv[2:]
    if argv[1] == "-m":
        module = {
            "jdiff.cli.train": "train",
            "jdiff.cli.sample": "sample",
            "jdiff.cli.export": "export",
            "jdiff.cli.encode": "encode",
        }
        if argv[2] in module:
            return module[argv[2]], argv[3:]
        return ("pytest", argv[3:]) if argv[2] == "pytest" else ("skip", [])
    if argv[1] == "-c":  # a training entry point called from Python: its arguments are train.py's
        return ("train", argv[3:]) if "jdiff.cli.train" in argv[2] else ("skip", [])
    return "script", argv[1:]


def _exit_message(capsys, e: SystemExit) -> str:
    return f"exit status {e.code}: {capsys.readouterr().err.strip()}"


def _check_train(args):
    from jdiff.cli.train import parse_args
    from jdiff.config import apply_overrides, get_preset

    ns, overrides = parse_args(args)
    flat = [k for k, _ in overrides if "." not in k]
    assert not flat, f"the docs spell config keys as --SECTION.FIELD, not --{flat[0]}"
    apply_overrides(get_preset(ns.preset or "digits"), overrides)  # every value parsed and range-checked


def _check_sample(args):
    from jdiff.cli.sample import build_parser
    from jdiff.sampling import check_options

    ns = build_parser().parse_args(args)
    options = {k.split(":", 1)[1]: v for k, v in vars(ns).items() if k.startswith("option:") and v is not None}
    check_options(ns.sampler or "ddim", options)  # each option exists for this sampler (default ddim) and is valid


def _check_export(args):
    from jdiff.cli.export import build_parser

    build_parser().parse_args(args)


def _check_encode(args):
    from jdiff.cli.encode import parse_args

    parse_args(args)


def _check_pytest(args):
    takes_value = {"-k", "-m", "-n", "-p", "--maxfail", "--durations"}
    skip = False
    for a in args:
        if skip or a.startswith("-"):
            skip = a in takes_value
            continue
        assert (REPO / a.split("::")[0]).exists(), f"pytest path {a} does not exist"


def _sources(script: Path) -> str:
    """The script's source and that of the jdiff modules it imports `main` / parsers from (thin wrappers)."""
    text = script.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jdiff"):
            path = REPO / (node.module.replace(".", "/") + ".py")
            if path.is_file():
                text += path.read_text()
    return text


def _check_script(args):
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    source = _sources(script)
    for a in args[1:]:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert f'"{flag}"' in source, f"{args[0]} has no flag {flag}"


CHECKS = {
    "train": _check_train,
    "sample": _check_sample,
    "export": _check_export,
    "encode": _check_encode,
    "pytest": _check_pytest,
    "script": _check_script,
}


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_parses(argv, capsys):
    what, args = _python_command(argv)
    if what == "skip":
        return
    try:
        CHECKS[what](args)
    except SystemExit as e:  # argparse / the CLIs' one-line errors; --help exits 0
        if not (e.code == 0 and ("--help" in args or "-h" in args)):
            pytest.fail(f"{' '.join(argv)}: {_exit_message(capsys, e)}")
    except ValueError as e:  # ConfigError and the sampler checks
        pytest.fail(f"{' '.join(argv)}: {e}")


def test_the_commands_were_found():
    kinds = [_python_command(argv)[0] for _, argv in COMMANDS]
    assert kinds.count("train") >= 10 and kinds.count("sample") >= 10 and "script" in kinds


def test_readme_example_runs_and_is_finite():
    (page, _, code), *_ = [b for b in _blocks("python") if b[0].name == "README.md"]
    namespace: dict = {}
    exec(compile(code, str(page), "exec"), namespace)
    samples = np.asarray(namespace["samples"])
    assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
    assert np.isfinite(float(namespace["loss"]))


def test_every_python_block_is_the_readme_example():
    """Python blocks are run (above); a signature or output is shown in a plain ``` block instead."""
    assert [b[0].name for b in _blocks("python")] == ["README.md"]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _outside_fences(text: str) -> str:
    return FENCE.sub("", text)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    text = _outside_fences(page.read_text())
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", _outside_fences(dest.read_text()), re.M)}
            if anchor not in slugs:
                bad.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: " + "; ".join(bad)


def test_the_tests_named_in_the_docs_exist():
    tests = REPO / "tests"
    files = [p.name for p in tests.glob("*.py")]
    names = [n for p in tests.glob("*.py") for n in re.findall(r"^def (test_\w+)", p.read_text(), re.M)]
    missing = []
    for page in PAGES:
        for ref in re.findall(r"\btest_[\w*]+(?:\.py)?(?:::test_[\w*]+)?", page.read_text()):
            if re.search(r"[A-Z]", ref):  # a template, e.g. test_models_NAME.py
                continue
            for part in ref.split("::"):  # a file, a test, or file::test; * as in a shell pattern
                if not fnmatch.filter(files if part.endswith(".py") else names, part):
                    missing.append(f"{_rel(page)}: {ref}")
    assert not missing, "tests named in the docs that do not exist: " + "; ".join(missing)


def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_ci_runs_readmes_test_command():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    ci = lines[lines.index("# README: test command") + 1].replace("pip install -q ", "pip install ")
    readme = [c for page, _, block in _blocks("bash") if page.name == "README.md" for c in block.splitlines()]
    assert any(c.endswith(ci) for c in readme if "pytest" in c), f"README's test command is not .ci/run's: {ci}"
