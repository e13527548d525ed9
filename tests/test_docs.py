"""The docs (README.md, docs/*.md, benchmarks/RESULTS.md) name only what exists, so a command copied from them runs:
- every dotted key in a code span or block whose first part is a section of the run `Config` (`trainer.max_steps`,
  `curriculum.0.steps`, `logger.*`) is a field of the schema, and one of a `dreamshot prepare` section
  (`shots.threshold`) a field of `PrepareConfig`; so is every key the package's messages and help texts name;
- every `dreamshot <command>` line names a subcommand and only options of its parser, every `python benchmarks/x.py` /
  `python -m dreamshot.module` line only options that script declares, every `group=option` (`trainer=gpu`) a file
  of conf/, and every `make` line a Makefile target and variables the Makefile (or the script it runs) reads; `make
  help` describes every target, and `make demo` scores where `dreamshot report` reads a run's evaluations;
- every relative link resolves (file, and heading or `<a id>` anchor), every repository path and `tests/x.py::test`
  exists, every experiment named as one is in experiments/;
- the lists the docs give in full stay full (the resume-safe keys, the experiments, the config group options,
  docs/prepare.md's settings with their defaults) and their counts true;
- the figures the docs quote from `dreamshot plan` (per-GPU memory, longest storyboards, context-parallel traffic)
  are what it prints."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import io
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml

from dreamshot.config.schema import Config
from dreamshot.prepare.config import PrepareConfig

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
# The reports committed beside the measurements (their plots and tables are what RESULTS.md and the README cite).
RESULT_REPORTS = sorted((ROOT / "benchmarks" / "results").rglob("*.md"))


# Sections only (a dataclass or a list of them): a scalar field (`name`, `seed`) with a dot is prose or a file name.
def _sections(root: type) -> set[str]:
    return {
        name
        for name, kind in typing.get_type_hints(root).items()
        if dataclasses.is_dataclass(kind)
        or (typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]))
    }


SECTIONS = _sections(Config)
PREPARE_SECTIONS = _sections(PrepareConfig)
assert not SECTIONS & PREPARE_SECTIONS  # a dotted key tells by its first part which config it belongs to
# A dotted word not inside a path or a longer name; not a call (`model.eval()`) or a file (`storyboard.png`).
KEY = re.compile(r"(?<![\w/.$-])([a-z_]+(?:\.(?:[a-z0-9_]+|\*))+)(?![\w(])")
FILE_SUFFIXES = {"png", "jpg", "json", "jsonl", "yaml", "md", "py", "txt", "csv", "ckpt", "safetensors", "pth", "onnx"}


def code_spans(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return blocks + re.findall(r"`([^`]+)`", prose)


def span_keys(span: str, sections: set[str] = SECTIONS) -> set[str]:
    """The dotted config keys in a piece of code whose first part is one of `sections`."""
    return {
        key for key in KEY.findall(span) if key.split(".")[0] in sections and key.split(".")[-1] not in FILE_SUFFIXES
    }


def config_keys(text: str, sections: set[str] = SECTIONS) -> set[str]:
    """The dotted config keys named in the code of `text` whose first part is one of `sections`."""
    return {key for span in code_spans(text) for key in span_keys(span, sections)}


def is_schema_key(key: str, root: type = Config) -> bool:
    """Whether `key` names a field of `root` (a list entry by its index; `*`: any field below)."""
    kind: typing.Any = root
    for part in key.split("."):
        if part == "*":
            return dataclasses.is_dataclass(kind)
        origin = typing.get_origin(kind)
        if origin is list and part.isdigit():
            kind = typing.get_args(kind)[0]
        elif origin is dict:  # free-form options (inference.cache_options): any key
            return True
        elif dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            if part not in hints:
                return False
            kind = _without_none(hints[part])
        else:
            return False
    return True


def _without_none(kind: typing.Any) -> typing.Any:
    """`X` of an optional field `X | None`."""
    if isinstance(kind, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return kind


def test_the_key_check_tells_keys_from_other_words():
    text = (
        "Set `trainer.max_stepz=5` or `curriculum.0.steps=15`, `logger.*`, `inference.cache_options.threshold`;\n"
        "not `outputs/dreamshot/x.py`, `model.eval()`, `storyboard.png`, `name.sub`.\n"
        "```\ndreamshot train smoke data.toy.groupz=3 eval.judge.model=gpt-4.1\n```\n"
    )
    keys = config_keys(text)
    assert keys == {
        "trainer.max_stepz",
        "curriculum.0.steps",
        "logger.*",
        "inference.cache_options.threshold",
        "data.toy.groupz",
        "eval.judge.model",
    }
    assert {key for key in keys if not is_schema_key(key)} == {"trainer.max_stepz", "data.toy.groupz"}


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_config_key_in_the_docs_exists(doc):
    keys = config_keys(doc.read_text(encoding="utf-8"))
    assert sorted(key for key in keys if not is_schema_key(key)) == []


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_prepare_setting_in_the_docs_exists(doc):
    keys = config_keys(doc.read_text(encoding="utf-8"), PREPARE_SECTIONS)
    assert sorted(key for key in keys if not is_schema_key(key, PrepareConfig)) == []


def message_strings(source: str) -> list[str]:
    """The string literals of a module that are not docstrings: its error messages, help texts and hints."""
    tree = ast.parse(source)
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_message_check_reads_messages_not_docstrings():
    source = '"""About `trainer.fit`."""\ndef f(k):\n    """Calls trainer.fit."""\n'
    source += '    raise E(f"set {k}: trainer.max_stepz=")\n'
    assert [key for text in message_strings(source) for key in span_keys(text)] == ["trainer.max_stepz"]


def test_every_config_key_the_package_tells_the_user_exists():
    """Error messages and help texts name keys to set (`pass data.manifest=...`): each must be one."""
    wrong = []
    for path in sorted((ROOT / "dreamshot").rglob("*.py")):
        for text in message_strings(path.read_text(encoding="utf-8")):
            keys = [(key, Config) for key in span_keys(text)]
            keys += [(key, PrepareConfig) for key in span_keys(text, PREPARE_SECTIONS)]
            wrong += [f"{path.relative_to(ROOT)}: {key}" for key, root in keys if not is_schema_key(key, root)]
    assert wrong == []


# --- command lines -----------------------------------------------------------------------------------------------

# `dreamshot CMD ...` or `-m dreamshot.cli CMD ...`, up to the end of the line or the next command.
COMMAND_LINE = re.compile(r"\bdreamshot(?:\.cli)? ([a-z]+)(?=\s|$)((?:(?!\bdreamshot\b|\bmake\b)[^\n#])*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
MAKE_LINE = re.compile(r"\bmake ([a-z][\w-]*)((?:(?!\bdreamshot\b|\bmake\b)[^\n#])*)")
MAKE_VARIABLE = re.compile(r"(?<![\w.-])([A-Z][A-Z0-9_]*)=")


def command_lines(text: str) -> list[tuple[str, str]]:
    """(command, the rest of its line) of every `dreamshot` command line in the code of `text`."""
    return [line for span in code_spans(text) for line in COMMAND_LINE.findall(span.replace("\\\n", " "))]


def command_options(text: str) -> list[tuple[str, str]]:
    """(command, option) of every option written on a `dreamshot` command line in the code of `text`."""
    return [(command, option) for command, rest in command_lines(text) for option in OPTION.findall(rest)]


# `python benchmarks/x.py ...` or `python -m dreamshot.some.module ...` (not the CLI: COMMAND_LINE reads that).
SCRIPT_LINE = re.compile(
    r"\bpython (?:-m )?(benchmarks/\w+\.py|dreamshot(?:\.(?!cli\b)\w+)+)((?:(?!\bpython\b|\bmake\b)[^\n#])*)"
)


def script_options(text: str) -> list[tuple[str, str]]:
    """(script file, option) of every option written on a `python benchmarks/...` or `python -m dreamshot....`
    line in the code of `text`."""
    found = []
    for span in code_spans(text):
        for script, rest in SCRIPT_LINE.findall(span.replace("\\\n", " ")):
            path = script if script.endswith(".py") else script.replace(".", "/") + ".py"
            found += [(path, option) for option in OPTION.findall(rest)]
    return found


def declared_options(script: Path) -> set[str]:
    """The option strings a script's own `add_argument` calls declare (read from its source: running a benchmark's
    `--help` imports torch; a helper it calls from elsewhere, `add_experiment_arguments`, adds positionals only)."""
    return {
        arg.value
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
    }


def make_calls(text: str) -> list[tuple[str, list[str]]]:
    """(target, variables set) of every `make` line in the code of `text`."""
    return [
        (target, MAKE_VARIABLE.findall(rest))
        for span in code_spans(text)
        for target, rest in MAKE_LINE.findall(span.replace("\\\n", " "))
    ]


def parser_options() -> dict[str, set[str]]:
    """Every subcommand's option strings, from the parser `dreamshot` runs."""
    from dreamshot.cli import COMMANDS, build_parser

    options = {}
    for command in COMMANDS:
        (sub,) = [action for action in build_parser(command)._actions if action.dest == "command"]
        options[command] = {flag for action in sub.choices[command]._actions for flag in action.option_strings}
    return options


def makefile_names() -> tuple[set[str], set[str]]:
    """The Makefile's targets, and the variables it (or the GPU check script `make bench-gpu` runs) reads."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    variables = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", makefile))
    variables |= set(
        re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "benchmarks" / "gpu_checks.sh").read_text(encoding="utf-8"))
    )
    return targets, variables


def test_the_command_line_check_reads_options_and_make_variables():
    text = (
        "Run `dreamshot generate STORY --run RUN \\| --lora FILE --presets fast` or\n"
        "```\ntorchrun --nproc-per-node 8 -m dreamshot.cli eval toy --out x  # --not-this\n"
        "make eval BENCH=toy CKPT=outputs/demo ARGS='eval.steps=2'\n```\n"
        "Not an option: `dreamshot train: error: unrecognized arguments: --bogus`."
    )
    assert command_options(text) == [
        ("eval", "--out"),
        ("generate", "--run"),
        ("generate", "--lora"),
        ("generate", "--presets"),
    ]
    assert make_calls(text) == [("eval", ["BENCH", "CKPT", "ARGS"])]


def test_every_command_option_in_the_docs_exists():
    options = parser_options()
    wrong = [
        f"{doc.relative_to(ROOT)}: dreamshot {command} {option}"
        for doc in DOCS
        for command, option in command_options(doc.read_text(encoding="utf-8"))
        if command in options and option not in options[command]
    ]
    assert wrong == []


def test_the_command_check_finds_a_command_and_a_script_option_that_do_not_exist():
    from dreamshot.cli import COMMANDS

    text = (
        "`dreamshot evaluate toy --run outputs/demo` and `dreamshot plan dreamshot`;\n"
        "```\nOMP_NUM_THREADS=1 python benchmarks/peers.py --steps 20 --sampel-calls 6  # --not-this\n"
        "python -m dreamshot.report.sweep toy_reproduction --eval toy\n```\n"
    )
    assert [command for command, _ in command_lines(text) if command not in COMMANDS] == ["evaluate"]
    assert script_options(text) == [
        ("benchmarks/peers.py", "--steps"),
        ("benchmarks/peers.py", "--sampel-calls"),
        ("dreamshot/report/sweep.py", "--eval"),
    ]
    wrong = [option for script, option in script_options(text) if option not in declared_options(ROOT / script)]
    assert wrong == ["--sampel-calls"]


def test_every_command_in_the_docs_exists():
    from dreamshot.cli import COMMANDS

    wrong = [
        f"{doc.relative_to(ROOT)}: dreamshot {command}"
        for doc in DOCS
        for command, _ in command_lines(doc.read_text(encoding="utf-8"))
        if command not in COMMANDS
    ]
    assert wrong == []


def test_every_script_option_in_the_docs_exists():
    """`python benchmarks/x.py --flag` and `python -m dreamshot.module --flag`: the script declares the flag."""
    wrong = [
        f"{doc.relative_to(ROOT)}: python {script} {option}"
        for doc in DOCS
        for script, option in script_options(doc.read_text(encoding="utf-8"))
        if not (ROOT / script).exists() or option not in declared_options(ROOT / script)
    ]
    assert wrong == []


def test_make_help_lists_every_target():
    """The README says `make help` lists every target: it prints the targets with a `## ` description."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets, _ = makefile_names()
    described = set(re.findall(r"^([a-z][\w-]*):.*## ", makefile, flags=re.M))
    assert sorted(targets - described) == []


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target's recipe."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    (recipe,) = re.findall(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    return [line.strip() for line in recipe.splitlines()]


def test_make_demo_scores_into_a_folder_the_report_reads_as_the_runs(tmp_path):
    """The README: `make demo` scores the toy benchmark into its run's `eval/`, where `dreamshot report` reads a run's
    evaluations (one folder per evaluation below `eval/`, as `make sweep`'s `--eval` writes them)."""
    from dreamshot.report.runs import _results_files

    (line,) = [line for line in make_recipe("demo") if "dreamshot eval" in line]
    run, out = (tmp_path / re.search(rf"{flag} (\S+)", line)[1] for flag in ("--run", "--out"))
    (out / "results.json").parent.mkdir(parents=True)
    (out / "results.json").write_text("{}", encoding="utf-8")
    assert _results_files(run) == [out / "results.json"]


def test_every_make_call_in_the_docs_exists():
    targets, variables = makefile_names()
    wrong = [
        f"{doc.relative_to(ROOT)}: make {target} {' '.join(names)}"
        for doc in DOCS
        for target, names in make_calls(doc.read_text(encoding="utf-8"))
        if target not in targets or not set(names) <= variables
    ]
    assert wrong == []


# --- links, paths, experiments -----------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"(?<![\w/.<:-])((?:dreamshot|tests|benchmarks|conf|experiments|examples|notebooks|docs)/[\w./*-]*[\w/*])(?:::(\w+))?"
)


def anchors(doc: Path) -> set[str]:
    """The anchors of a markdown file: GitHub's slug of every heading, and every `<a id="...">`."""
    text = doc.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)">', text))


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path) if path else doc
        if not linked.exists() or (anchor and (linked.suffix != ".md" or anchor not in anchors(linked))):
            broken.append(target)
    return broken


def git_ignored(path: str) -> bool:
    """Whether `path` is one the repository's .gitignore leaves to each machine (conf/local.yaml, logs)."""
    patterns = [
        line.strip().strip("/")
        for line in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return any(path.strip("/") == pattern or path.startswith(pattern.rstrip("/") + "/") for pattern in patterns)


def missing_paths(text: str) -> list[str]:
    """Repository paths (and `tests/x.py::test_name`) named in `text` that do not exist."""
    missing = []
    for path, test in REPO_PATH.findall(re.sub(r"https?://\S+", "", text)):
        found = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
        if test and found:
            found = [
                file for file in found if re.search(rf"^\s*def {test}\(", file.read_text(encoding="utf-8"), flags=re.M)
            ]
        if not found and not git_ignored(path):
            missing.append(f"{path}::{test}" if test else path)
    return missing


def test_the_link_and_path_checks_find_what_is_missing(tmp_path):
    (tmp_path / "a.md").write_text('# A title, here\n<a id="kept"></a>\n', encoding="utf-8")
    doc = tmp_path / "b.md"
    doc.write_text("[x](a.md#a-title-here) [y](a.md#kept) [z](a.md#gone) [w](nope.md) [u](https://x.org)\n")
    assert broken_links(doc) == ["a.md#gone", "nope.md"]
    text = "`tests/test_docs.py::test_every_link_resolves`, tests/test_docs.py::no_such_test, `dreamshot/nope.py`"
    text += ", conf/local.yaml (git-ignored)"
    assert missing_paths(text) == ["tests/test_docs.py::no_such_test", "dreamshot/nope.py"]


@pytest.mark.parametrize(
    "doc", DOCS + RESULT_REPORTS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS + RESULT_REPORTS]
)
def test_every_link_resolves(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_repository_path_in_the_docs_exists(doc):
    assert missing_paths(doc.read_text(encoding="utf-8")) == []


EXPERIMENTS = {path.stem for path in (ROOT / "experiments").glob("*.yaml")}
# An experiment in a command: `dreamshot train|cache|plan NAME`, `python -m dreamshot.report.sweep NAME`, `EXP=NAME`.
EXPERIMENT_USE = re.compile(
    r"(?:\bdreamshot(?:\.cli)? (?:train|cache|plan) +|\bdreamshot\.report\.sweep +|\b(?:EXP|SWEEP|GROUP)=)([a-z]\w*)"
)


def readme_experiment_table() -> set[str]:
    """The names in the first column of the README's experiment table (`toy_*` stands for the toy twins)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("| experiment | what it is |", 1)[1].split("\n\n", 1)[0]
    return {name for row in table.splitlines()[2:] for name in re.findall(r"`([\w*]+)`", row.split("|")[1])}


def test_the_experiment_check_reads_commands():
    text = (
        "`make train EXP=smoke`, `dreamshot plan dreamshot --phase 2`, `make report GROUP=toy_x`, "
        "`torchrun -m dreamshot.cli train dreamshot trainer.num_nodes=2`, `dreamshot train EXPERIMENT`, "
        "`dreamshot train: error: ...`, ``` python -m dreamshot.report.sweep toy_reproduction --eval toy ```"
    )
    found = sorted(name for span in code_spans(text) for name in EXPERIMENT_USE.findall(span))
    assert found == ["dreamshot", "dreamshot", "smoke", "toy_reproduction", "toy_x"]


def test_every_experiment_named_in_the_docs_exists():
    named = {
        name
        for doc in DOCS
        for span in code_spans(doc.read_text(encoding="utf-8"))
        for name in EXPERIMENT_USE.findall(span)
    }
    assert sorted(named - EXPERIMENTS) == []
    assert sorted(readme_experiment_table() - EXPERIMENTS - {"toy_*"}) == []


def test_the_readme_experiment_table_names_every_shipped_experiment():
    """The table names each experiment, or a toy one as `toy_*`, the toy twin of a paper experiment it names."""
    table = readme_experiment_table()
    unnamed = {
        name
        for name in EXPERIMENTS - table
        if not (name.startswith("toy_") and name.removeprefix("toy_") in table and "toy_*" in table)
    }
    assert sorted(unnamed) == []
    twins = {name for name in table if f"toy_{name}" in EXPERIMENTS}
    assert twins >= {name for name in table - {"smoke", "demo", "toy_*"} if not name.startswith("toy_")}


# --- config group options ----------------------------------------------------------------------------------------

CONF_GROUPS = sorted(path.name for path in (ROOT / "conf").iterdir() if path.is_dir())
# `trainer=gpu`, `model=wan14b`: a base group option chosen on the command line (not `trainer.devices=8`).
GROUP_OPTION = re.compile(rf"(?<![\w.$-])({'|'.join(CONF_GROUPS)})=([\w.-]+)")


def missing_group_options(text: str) -> list[str]:
    """`group=option` choices in the code of `text` that conf/ has no `<group>/<option>.yaml` for."""
    return [
        f"{group}={option}"
        for span in code_spans(text)
        for group, option in GROUP_OPTION.findall(span)
        if not (ROOT / "conf" / group / f"{option}.yaml").is_file()
    ]


def readme_group_options(readme: str) -> dict[str, set[str]]:
    """The options the README's config section lists per base group: "`model` (`tiny`, `wan1_3b`, `wan14b`), ..."."""
    listing = readme.split("one option per base group in `conf/`", 1)[1].split("chosen by", 1)[0]
    return {
        group: set(re.findall(r"`(\w+)`", options))
        for group, options in re.findall(rf"`({'|'.join(CONF_GROUPS)})` \(([^()]*)\)", listing)
    }


def test_the_group_option_check_finds_an_option_conf_lacks():
    text = "`trainer=gpu`, `trainer=zero2`, `trainer.devices=8`\n```\ndreamshot train dreamshot model=wan13b\n```\n"
    assert missing_group_options(text) == ["model=wan13b", "trainer=zero2"]


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_every_group_option_in_the_docs_exists(doc):
    assert missing_group_options(doc.read_text(encoding="utf-8")) == []


def shipped_group_options() -> dict[str, set[str]]:
    return {group: {path.stem for path in (ROOT / "conf" / group).glob("*.yaml")} for group in CONF_GROUPS}


def test_the_readme_lists_every_config_group_option():
    assert readme_group_options((ROOT / "README.md").read_text(encoding="utf-8")) == shipped_group_options()


def test_the_multinode_preset_table_lists_every_trainer_option():
    doc = (ROOT / "docs" / "multinode.md").read_text(encoding="utf-8")
    (table,) = [t for t in markdown_tables(doc) if t and "`trainer=`" in t[0]]
    listed = {re.match(r"`(\w+)`", row["`trainer=`"])[1] for row in table}
    assert listed == shipped_group_options()["trainer"]


# --- lists and counts the README gives ---------------------------------------------------------------------------


def test_the_readme_names_every_resume_safe_key():
    from dreamshot.training.resume import RESUME_SAFE_KEYS

    spans = set(code_spans((ROOT / "README.md").read_text(encoding="utf-8")))
    named = {key[:-1] + ".*" if key.endswith(".") else key for key in RESUME_SAFE_KEYS}
    assert sorted(key for key in named if key not in spans) == []


def test_the_readme_fault_corpus_count_holds():
    cases = yaml.safe_load((ROOT / "tests" / "faults" / "cases.yaml").read_text(encoding="utf-8"))["cases"]
    (claim,) = re.findall(
        r"holds a corpus of over (\d+) malformed inputs", (ROOT / "README.md").read_text(encoding="utf-8")
    )
    assert int(claim) <= len(cases)


# --- figures the docs quote from `dreamshot plan` ---------------------------------------------------------------


@functools.cache
def plan_output(command: str) -> str:
    """What a `dreamshot plan ...` command line prints."""
    from dreamshot.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(shlex.split(command)[1:]) == 0
    return printed.getvalue()


def plan_memory(out: str) -> list[float]:
    """Per planned phase, the GiB per GPU of the first (checkpointing) column of its memory table."""
    return [float(re.search(r"^  total +([\d.]+)", part, flags=re.M)[1]) for part in out.split("Memory per GPU")[1:]]


def plan_figure(out: str, pattern: str) -> float:
    """The number `pattern`'s group reads from the plan (the figure of its first match)."""
    return float(re.search(pattern, out, flags=re.M)[1])


PLAN_LONGEST = r"^Longest storyboard in [\d.]+ GiB .*: (\d+) shots"
# The figures written in prose: (doc, pattern of the claim, the plan it quotes, what each of its groups reads).
PLAN_CLAIMS = [
    (
        "README.md",
        r"predicts ([\d.]+) GiB per GPU in the 192p RACL phase and ([\d.]+) GiB at 480p",
        "dreamshot plan dreamshot",
        [lambda out: plan_memory(out)[0], lambda out: plan_memory(out)[1]],
    ),
    (
        "docs/multinode.md",
        r"plans at ([\d.]+) GiB per GPU on 8 GPUs, ([\d.]+) GiB of it umT5's weights",
        "dreamshot plan dreamshot",
        [lambda out: plan_memory(out)[1], lambda out: plan_figure(out, r"^  umT5 weights +([\d.]+)")],
    ),
    (
        "docs/multinode.md",
        r"plans at ([\d.]+) GiB per GPU for 30 shots\s+\+ 4 references \(53,040 tokens\)"
        r" and fits no more than (\d+) shots",
        "dreamshot plan dreamshot --phase 2 --refs 4 --shots 30",
        [lambda out: plan_memory(out)[0], lambda out: plan_figure(out, PLAN_LONGEST)],
    ),
    (
        "docs/multinode.md",
        r"about ([\d.]+) GiB per GPU for 14B, 30 shots \+ 4 references at CP 4",
        "dreamshot plan dreamshot --phase 2 --refs 4 --shots 30 --context-parallel 4 "
        "trainer.context_parallel.attention=ring",
        [lambda out: plan_figure(out, r"^  ring attention kept +([\d.]+)")],
    ),
    (
        "docs/multinode.md",
        r"The 1.3B model fits\s+(\d+) shots without CP",
        "dreamshot plan dreamshot --phase 2 --refs 4 model=wan1_3b",
        [lambda out: plan_figure(out, PLAN_LONGEST)],
    ),
]


def plan_claim_mismatches(text: str, pattern: str, command: str, reads: list) -> list[str]:
    (claim,) = re.findall(pattern, text)
    shown = [claim] if isinstance(claim, str) else list(claim)
    out = plan_output(command)
    return [f"{s} (plan: {read(out)})" for s, read in zip(shown, reads, strict=True) if not agrees(s, read(out))]


def context_parallel_table_mismatches(doc: str) -> list[str]:
    """docs/multinode.md's degree table against the plan command written above it, at each degree."""
    (command,) = re.findall(r"`(dreamshot plan [^`]*--shots S --context-parallel N)`", doc)
    (table,) = [t for t in markdown_tables(doc) if t and "14B, 480p, 4 references" in t[0]]
    rows = {row["14B, 480p, 4 references"].split(",")[0].split(" (")[0]: row for row in table}
    wrong = []
    for column in [name for name in table[0] if name.startswith("CP ")]:
        degree = column.removeprefix("CP ")
        out = plan_output(
            command.replace("--shots S", "--shots 30").replace("--context-parallel N", f"--context-parallel {degree}")
        )
        cells = {
            "per GPU": (rows["per GPU"][column], [plan_memory(out)[0]]),
            "longest storyboard in 80 GiB": (
                rows["longest storyboard in 80 GiB"][column],
                [plan_figure(out, PLAN_LONGEST)],
            ),
        }
        if column != "CP 1":  # one GPU per storyboard sends nothing
            traffic = re.search(r"^  ulysses attention .*? ([\d.]+) +([\d.]+)$", out, flags=re.M)
            cells["Ulysses traffic per GPU step"] = (
                rows["Ulysses traffic per GPU step"][column],
                [float(traffic[1]), float(traffic[2])],
            )
        for row, (cell, values) in cells.items():
            shown = NUMBER.findall(cell.replace(",", ""))
            if len(shown) != len(values) or not all(map(agrees, shown, values)):
                wrong.append(f"{row} / {column}: {cell} (plan: {values})")
    return wrong


@pytest.mark.parametrize(
    "doc, pattern, command, reads", PLAN_CLAIMS, ids=[f"{claim[0]}-{i}" for i, claim in enumerate(PLAN_CLAIMS)]
)
def test_every_planner_figure_in_the_docs_is_what_plan_prints(doc, pattern, command, reads):
    assert plan_claim_mismatches((ROOT / doc).read_text(encoding="utf-8"), pattern, command, reads) == []


def test_the_context_parallel_table_is_what_plan_prints():
    doc = (ROOT / "docs" / "multinode.md").read_text(encoding="utf-8")
    assert context_parallel_table_mismatches(doc) == []


def test_the_planner_checks_find_a_wrong_figure():
    doc = (ROOT / "docs" / "multinode.md").read_text(encoding="utf-8")
    broken = doc.replace("| 77.6 GiB | 59.8 GiB |", "| 77.6 GiB | 58.8 GiB |").replace("| 140 shots |", "| 150 shots |")
    assert context_parallel_table_mismatches(broken) == [
        "per GPU / CP 2: 58.8 GiB (plan: [59.822])",
        "longest storyboard in 80 GiB / CP 4: 150 shots (plan: [140.0])",
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("predicts 44.1 GiB", "predicts 41.1 GiB")
    assert plan_claim_mismatches(readme, *PLAN_CLAIMS[0][1:]) == ["41.1 (plan: 44.092)"]


# --- docs/prepare.md's settings table against PrepareConfig --------------------------------------------------------


def schema_defaults(root: type, prefix: str = "") -> dict[str, typing.Any]:
    """Every scalar setting of a config dataclass, `section.key` -> its default."""
    defaults = {}
    for spec in dataclasses.fields(root):
        value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(value):
            defaults |= schema_defaults(type(value), f"{prefix}{spec.name}.")
        else:
            defaults[f"{prefix}{spec.name}"] = value
    return defaults


def settings_table_mismatches(doc: str, root: type) -> list[str]:
    """Rows of the doc's `| setting | default | meaning |` table whose default is not the schema's, and the settings
    of `root` that neither it nor another table's `setting` column names (the Backends table lists the choices)."""
    tables = [table for table in markdown_tables(doc) if table and "setting" in table[0]]
    (settings,) = [table for table in tables if "default" in table[0]]
    defaults = schema_defaults(root)
    wrong = []
    for row in settings:
        key, shown = row["setting"].strip("`"), row["default"].strip("`")
        if key not in defaults or yaml.safe_load(shown) != defaults[key]:
            wrong.append(f"{key}: {shown} (schema: {defaults.get(key, 'no such setting')})")
    named = {row["setting"].strip("`") for table in tables for row in table}
    return wrong + [f"{key}: not in the tables" for key in defaults if key not in named]


def test_the_settings_table_check_finds_a_wrong_default_and_a_missing_setting():
    doc = (ROOT / "docs" / "prepare.md").read_text(encoding="utf-8")
    assert settings_table_mismatches(doc, PrepareConfig) == []
    broken = doc.replace("| `grouping.window` | 8 |", "| `grouping.window` | 6 |")
    broken = re.sub(r"^\| `vlm\.timeout_s` .*\n", "", broken, flags=re.M)
    assert settings_table_mismatches(broken, PrepareConfig) == [
        "grouping.window: 6 (schema: 8)",
        "vlm.timeout_s: not in the tables",
    ]


def test_the_prepare_settings_table_is_the_config():
    """docs/prepare.md gives "every setting, its default and its unit": each default is PrepareConfig's."""
    doc = (ROOT / "docs" / "prepare.md").read_text(encoding="utf-8")
    assert settings_table_mismatches(doc, PrepareConfig) == []


# --- the README's toy reproduction table against the report it cites ----------------------------------------------

NUMBER = re.compile(r"[+−-]?\d+(?:\.\d+)?")
# README row -> (report setting, report column suffix: the end of the run, or the end of the RACL phase).
TOY_ROWS = {
    "without RACL": ("without_racl", ""),
    "with RACL (λ = 0.1)": ("with_racl", ""),
    "with RACL against without": ("with_racl", ""),
    "at the end of the RACL phase (step 1,500): without RACL": ("without_racl", "@phase1"),
    "at the end of the RACL phase: with RACL (λ = 0.1)": ("with_racl", "@phase1"),
    "at the end of the RACL phase: with against without": ("with_racl", "@phase1"),
}
# README column -> report columns (the toy proxies' means headed `<name> ×100`, as the report prints them).
TOY_COLUMNS = {
    "val/loss ↓": ["val/loss{} ↓"],
    "val/racl_in_mask": ["val/racl_in_mask{}"],
    "val/racl_confusion ↓": ["val/racl_confusion{} ↓"],
    "toy identity cross / self": ["toy_identity_cross", "toy_identity_self"],
    "toy style cross / self": ["toy_style_cross", "toy_style_self"],
}


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every table of a markdown text as rows of {header: cell}."""
    tables = []
    for block in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
        # A cell's `\|` is a character of the cell, not a column border.
        lines = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in block.splitlines()]
        tables.append([dict(zip(lines[0], row, strict=True)) for row in lines[2:]])
    return tables


def numbers(cell: str) -> list[float]:
    return [float(n.replace("−", "-")) for n in NUMBER.findall(cell)]


def agrees(shown: str, value: float) -> bool:
    """Whether the README's rounded `shown` is `value` (itself rounded to 4 significant digits in the report)."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown.replace("−", "-")) - value) <= 0.6 * 10**-decimals


def toy_table_mismatches(readme: str, report: str) -> list[str]:
    (table,) = [t for t in markdown_tables(readme) if t and "val/racl_confusion ↓" in t[0] and "run" in t[0]]
    means, changes = [t for t in markdown_tables(report) if t and "setting" in t[0]]
    means = {row["setting"]: row for row in means}
    changes = {row["setting"]: row for row in changes}
    wrong = []
    for row in table:
        label = next(name for name in TOY_ROWS if row["run"].startswith(name))
        setting, phase = TOY_ROWS[label]
        is_change = "against" in label
        for column, sources in TOY_COLUMNS.items():
            if not row[column]:
                continue
            report_row = (changes if is_change else means)[setting]
            names = [source.format(phase) for source in sources]
            cells = [report_row[name] if name in report_row else report_row[f"{name} ×100"] for name in names]
            if is_change:  # "+2.4% / −0.1%, 2 and 2 of 3" against "+2.43 (2/3)", "-0.149 (2/3)"
                percents, counts = row[column].split(",")
                expected = [numbers(cell) for cell in cells]  # [change, seeds better, seeds]
                shown = NUMBER.findall(percents)
                ok = len(shown) == len(expected) and all(agrees(s, e[0]) for s, e in zip(shown, expected, strict=True))
                ok &= [int(n) for n in numbers(counts)[:-1]] == [int(e[1]) for e in expected]
            else:  # "0.63 ± 0.18 / 51.2 ± 1.8" against "0.6323 ± 0.18", "51.2 ± 1.8"
                shown = NUMBER.findall(row[column])
                expected = [n for cell in cells for n in numbers(cell)]
                ok = len(shown) == len(expected) and all(map(agrees, shown, expected))
            if not ok:
                wrong.append(f"{label} / {column}: {row[column]} (report: {' ; '.join(cells)})")
    return wrong


def test_the_toy_table_check_finds_a_wrong_sign():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    report = (toy_report_folder(readme) / "report.md").read_text(encoding="utf-8")
    assert toy_table_mismatches(readme, report) == []
    flipped = readme.replace("| +14.2%, 2 of 3 |", "| −14.2%, 2 of 3 |")
    assert flipped != readme and len(toy_table_mismatches(flipped, report)) == 1


def toy_report_folder(readme: str) -> Path:
    section = readme.split("## Toy-scale reproduction", 1)[1]
    (folder,) = re.findall(r"\(the report: \[[^\]]+\]\(([^)]+)\)", section)
    return ROOT / folder


def test_the_readme_toy_reproduction_table_is_the_report_it_cites():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    report = (toy_report_folder(readme) / "report.md").read_text(encoding="utf-8")
    assert toy_table_mismatches(readme, report) == []
