"""The command line as a new user meets it: one name per concept, defaults in every --help, the top-level
help and --version, configs loadable by name after ``import flyt``, and docs that exist."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flyt import __version__, cli
from flyt.config import JOB_SPLIT_HELP, _f, add_dataclass_arguments

REPO = Path(__file__).resolve().parents[1]
# names that shipped before the vocabulary was unified: accepted, but never a flag's main name
OLD_NAMES = {"--pool", "--eval_dir", "--tasks", "--shuffle_seed"}


IMPORT_ORDERS = {
    # import flyt first: torch and open_clip stay out until open_clip is imported, which then knows flyt-tiny
    "flyt first": "import sys, flyt; assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, "
                  "'heavy import'\nimport open_clip; open_clip.create_model('flyt-tiny'); print('ok')",
    # open_clip first: import flyt registers at once
    "open_clip first": "import open_clip, flyt; open_clip.create_model('flyt-small'); print('ok')",
}


def test_import_flyt_is_enough_to_load_its_configs_by_name():
    """Both import orders, each in a fresh interpreter (run side by side: importing open_clip dominates).

    Mutations: not installing the meta_path hook fails "flyt first" ('flyt-tiny' unknown); dropping the
    ``'open_clip' in sys.modules`` branch fails "open_clip first"; importing open_clip in
    flyt/__init__.py fails "flyt first" ('heavy import')."""
    runs = {name: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name, code in IMPORT_ORDERS.items()}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", f"{name}: {err[-400:]}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for name in cli.SUBCOMMANDS:
        top = cli.build_parser([name])
        choices = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
        parsers[name] = choices[name]
    return parsers


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(list(argv)).parse_args(list(argv))


def test_one_name_per_concept_old_names_still_accepted():
    """Mutations: putting ``--pool`` first in reshard's flag, dropping the ``--tasks`` alias of eval, or
    storing JoinTokens' values as a list (not joined) each fail here."""
    mains, aliases = set(), set()
    for name, parser in _subparsers().items():
        for action in parser._actions:
            long = [s for s in action.option_strings if s.startswith("--")]
            if long:
                mains.add(long[0])
                aliases.update(long[1:])
            if "--num_shards" in action.option_strings or "--shard_index" in action.option_strings:
                assert action.help == JOB_SPLIT_HELP, name
    assert not mains & OLD_NAMES and OLD_NAMES <= aliases
    assert {"--upstream_data_dir", "--datacomp_eval_dir", "--downstream_task_names", "--pretrained"} <= mains

    reshard = ["--subset", "s.npy", "--output", "out"]
    assert _parse("reshard", "--pool", "p", "--shuffle_seed", "3", *reshard) == \
        _parse("reshard", "--upstream_data_dir", "p", "--seed", "3", *reshard)
    old = _parse("eval", "--model", "m", "--checkpoint", "c.pt", "--eval_dir", "e", "--tasks", "a", "b::c",
                 "--output", "o")
    new = _parse("eval", "--model", "m", "--pretrained", "c.pt", "--datacomp_eval_dir", "e",
                 "--downstream_task_names", "a::b", "c", "--output", "o")
    assert old == new and new.tasks == "a::b::c"
    for tasks in (["a::b"], ["a", "b"]):  # the original single '::' token, or several
        train = _parse("train", "--upstream_data_dir", "p", "--n_iterations", "1", "--downstream_task_names", *tasks)
        assert train.downstream_task_names == "a::b"


def test_dataclass_fields_take_aliases_from_metadata():
    """Mutation: ignoring the ``aliases`` metadata in add_dataclass_arguments fails (unknown --old)."""

    @dataclass
    class Config:
        new_name: int = _f(1, "a number", aliases=("--old",))
        on: bool = _f(False, "a switch", aliases=("--legacy_on",))

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Config)
    assert vars(parser.parse_args(["--old", "5", "--legacy_on"])) == {"new_name": 5, "on": True}


def test_every_help_shows_defaults_and_the_top_level_help_is_for_users(capsys):
    """Mutations: a subparser without ``formatter_class=HelpFormatter`` fails the per-action check; testing
    the default with ``in (None, False, ...)`` hides ``--seed``'s 0 and fails; no ``--version`` fails."""
    for name, parser in _subparsers().items():
        assert parser.formatter_class is cli.HelpFormatter, name
        formatter = parser.formatter_class(parser.prog)
        for action in parser._actions:
            default = action.default
            unset = default is None or default is False or default is argparse.SUPPRESS or default == []
            if action.option_strings and action.help and not action.required and not unset:
                assert "(default" in formatter._get_help_string(action), f"flyt {name} {action.option_strings[0]}"
    help_text = " ".join(_subparsers()["train"].format_help().split())
    assert "seed of initialisation, data order and templates (default: 0)" in help_text

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"flyt {__version__}"
    assert cli.main([]) == 0
    top = capsys.readouterr().out
    assert "pipeline: train -> score -> sample" in top and "flyt demo --output_dir" in top


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in listed.splitlines() if (REPO / line).is_file()]


def test_no_reference_to_files_users_do_not_get():
    """Every ``docs/...`` path mentioned in a tracked file exists, and nothing points to the design notes
    that are not in the repository. Mutation: pointing a docstring to a missing page under docs/ (or to
    the design notes again) fails."""
    design = re.compile("DESIGN" + r"(\.md|\s*§)")
    docs_path = re.compile(r"(?<![\w/])docs/[\w./-]*\w")
    missing, stale = [], []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(REPO)
        stale += [str(rel)] if design.search(text) else []
        missing += [f"{rel}: {ref}" for ref in docs_path.findall(text) if not (REPO / ref).exists()]
    assert not stale and not missing, (stale, missing)
    assert {"README.md", "algorithm.md", "formats.md", "input_scores.md"} <= {p.name for p in (REPO / "docs").iterdir()}


SHELL_OPERATORS = {"|", "||", "&", "&&", ";", "(", ")"}


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def flyt_commands(markdown: str) -> list[list[str]]:
    """The argv (subcommand first) of every ``flyt ...`` and ``-m flyt.train_flyt`` / ``-m flyt.cli`` call
    in the bash blocks: continuation lines joined, comments and redirections dropped, cut at shell operators, and each
    shell variable (``$S``, ``"$head:6379"``, ``${X}``) replaced by its name as a placeholder."""
    modules = {"flyt.train_flyt": ["train"], "flyt.cli": []}
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(re.sub(r"\$\{?(\w+)\}?", r"\1", line), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment, redirect = [], False
            for token in [*lexer, ";"]:
                if redirect or set(token) <= set("<>&") and "&" != token != "&&":  # 2>&1, > file: not argv
                    if not redirect and segment[-1:] and segment[-1].isdigit():
                        segment.pop()
                    redirect = not redirect
                    continue
                if token not in SHELL_OPERATORS:
                    segment.append(token)
                    continue
                if "flyt" in segment:
                    commands.append(segment[segment.index("flyt") + 1:])
                module = next((i for i, t in enumerate(segment[:-1]) if t == "-m" and segment[i + 1] in modules), None)
                if module is not None:
                    commands.append([*modules[segment[module + 1]], *segment[module + 2:]])
                segment = []
    return commands


def test_the_datacomp_recipe_runs_with_the_real_flags():
    """Every flyt command line of the README's "DataComp medium / xlarge" section parses with the real
    parsers, each ``--flag`` spelled in full (argparse would take a prefix), and the section shows every
    stage. Mutations: misspelling ``--ray_address`` as ``--ray_adress`` in the section, or
    abbreviating reshard's ``--shard_size`` to ``--shard_siz`` (a prefix argparse accepts), fails; so does
    a tokeniser that drops the ``-m flyt.train_flyt`` call (train missing)."""
    commands = flyt_commands(_readme_section("DataComp medium / xlarge"))
    subparsers = _subparsers()
    wrong = []
    for argv in commands:
        known = {s for action in subparsers[argv[0]]._actions for s in action.option_strings}
        wrong += [f"flyt {argv[0]} {flag}" for flag in argv[1:] if flag.startswith("--") and flag not in known]
        try:
            _parse(*argv)
        except SystemExit:
            wrong.append("flyt " + " ".join(argv))
    assert not wrong, wrong
    assert {argv[0] for argv in commands} == {"features", "train", "score", "sample", "reshard"}
