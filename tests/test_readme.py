"""Every command in README.md, docs/*.md and experiments/README.md against the real programs, and every
link between them.

Each shell command is either run (``--help``, experiments/run.py as ``--dry_run``) or parsed by the
argument parser of the script it calls, so a renamed or removed flag fails here. The main command and
the setup commands are run by .ci/run; here they are checked to be present verbatim. Python blocks
are executed (with the bundled sample's paths made absolute and outputs in a temporary folder).
"""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from bench import heldout
from experiments import collect, prepare, run
from mulmodseg.cli import predict as predict_cli
from mulmodseg.cli import train as train_cli
from mulmodseg.cli.evaluate import build_parser as evaluate_parser
from mulmodseg.cli.text import build_parser as text_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]
SETUP = ['pip install torch==2.13.0 && pip install -e ".[test]"', "python -m pytest -q"]
MAIN = ("python train.py --ct_dir data/sample/ct --mr_dir data/sample/mr --base_channels 8 --text onehot "
        "--spacing 4.5 4.5 4.5 --roi_size 48 --num_samples 4 --lr 3e-3 --warmup_epochs 5 --epochs 200 --num_workers 0 "
        "--out runs/demo")
PARSERS = {
    ("train.py",): train_cli.build_parser,
    ("infer.py",): predict_cli.build_parser,
    ("-m", "mulmodseg.text"): text_parser,
    ("-m", "mulmodseg.evaluate"): evaluate_parser,
    # setup.py's console commands: the same parsers.
    ("mulmodseg-train",): train_cli.build_parser,
    ("mulmodseg-predict",): predict_cli.build_parser,
    ("mulmodseg-evaluate",): evaluate_parser,
    ("mulmodseg-text",): text_parser,
    ("experiments/prepare.py",): prepare.build_parser,
    ("experiments/collect.py",): collect.build_parser,
    ("bench/heldout.py",): heldout.build_parser,
}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def shell_commands(body: str) -> list[str]:
    """Command lines of a shell block: continuations joined, comments and blank lines dropped."""
    lines = body.replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def program_and_args(command: str) -> tuple[tuple[str, ...], list[str]]:
    """``python train.py --x 1`` -> (("train.py",), ["--x", "1"]); torchrun and VAR=value prefixes removed."""
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        tokens.pop(0)
    if tokens[0] == "torchrun":
        tokens = tokens[1:]
        while tokens[0].startswith("--"):
            tokens.pop(0)
        tokens = ["python", *tokens]
    if tokens[0].startswith("mulmodseg-"):
        return (tokens[0],), tokens[1:]
    assert tokens[0] == "python", f"unknown program in {command!r}: add a check for it to tests/test_readme.py"
    if tokens[1] == "-m":
        return tuple(tokens[1:3]), tokens[3:]
    return (tokens[1],), tokens[2:]


def all_shell_commands() -> list[tuple[str, str]]:
    return [(path.name, command) for path in DOCS for lang, body in code_blocks(path)
            if lang in ("bash", "sh") for command in shell_commands(body)]


def test_setup_commands_open_the_readme_and_the_main_command_is_there():
    text = (ROOT / "README.md").read_text()
    first_lang, first_body = code_blocks(ROOT / "README.md")[0]
    assert first_lang == "bash" and shell_commands(first_body) == SETUP
    assert text.index("```bash") < text.index("\n## ")  # before any section
    main_commands = [c for _, c in all_shell_commands() if c == MAIN]
    assert len(main_commands) == 1


@pytest.mark.parametrize("doc,command", all_shell_commands())
def test_command(doc, command, tmp_path, capsys):
    if command in SETUP:
        return  # run by .ci/run
    program, args = program_and_args(command)
    if program == ("experiments/run.py",):
        cut = args.index("--") if "--" in args else len(args)
        assert run.main([*args[:cut], "--dry_run", *args[cut:]]) == 0
        planned = capsys.readouterr().out.splitlines()
        assert planned and all(line.startswith(("python ", "# smoke")) for line in planned)
        return
    assert program in PARSERS, f"unknown script in {command!r}: add a check for it to tests/test_readme.py"
    if args == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            PARSERS[program]().parse_args(["--help"])
        assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    parsed = PARSERS[program]().parse_args(args)
    if program == ("train.py",) and not parsed.plot_only:
        config = train_cli.config_from_args(parsed)  # values, not only names: ROI sizes, NAME=N pairs
        assert config.data_dirs


def test_python_blocks_run(tmp_path, monkeypatch):
    blocks = [(path, body) for path in DOCS for lang, body in code_blocks(path) if lang == "python"]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for path, body in blocks:
        if path == DOCS[0]:
            assert len(body.strip().splitlines()) <= 10  # "the Python API in ten lines"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(body.replace("data/sample/", f"{ROOT}/data/sample/"), str(path), "exec"), {})
        if path == DOCS[0]:
            assert out.getvalue().strip() == "(117, 91, 20) uint8"
            assert (tmp_path / "runs/api/last.pt").is_file()


def test_ci_runs_the_readme_commands_verbatim():
    """.ci/run's install, main, inference (CT and MR), smoke and test commands are the README's, so CI exercises
    what users type."""
    readme_commands = {cmd for _, body in code_blocks(ROOT / "README.md") for cmd in shell_commands(body)}
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith(("pip install", "python train.py", "python infer.py", "python -m pytest"))]
    assert len(ci_commands) == 6
    for command in ci_commands:
        assert command in readme_commands, command


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "bench" / "README.md", ROOT / "bench" / "RESULTS.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings_that_exist(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to {target}: no such file"
        if fragment and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{doc.name}: link to {target}: no such heading"
