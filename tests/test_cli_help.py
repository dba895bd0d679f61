"""The ``hf-taskarith`` help: every command is described, every argument explained, defaults
shown, ``--dtype`` a choice, and ``--no-progress`` / ``-q`` accepted everywhere. In-process (no
subprocess), so the whole file runs in a few seconds."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from hf_taskarith import TaskVector
from hf_taskarith.cli import common
from hf_taskarith.cli.main import COMMANDS, build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for the main parser and every (nested) sub-command."""
    yield path, parser
    for action in _subparsers(parser):
        for name, sub in action.choices.items():
            yield from _walk(sub, (*path, name))


PARSERS = dict(_walk(build_parser()))
COMMAND_PATHS = [p for p in PARSERS if p]


def test_every_command_is_walked():
    assert {p[0] for p in COMMAND_PATHS} == set(COMMANDS)
    assert ("hub", "serve") in COMMAND_PATHS


def _minimal_argv(path: tuple[str, ...]) -> list[str]:
    """``path`` plus placeholder values for the required positionals and options of its parsers."""
    argv: list[str] = []
    for depth in range(len(path) + 1):
        parser = PARSERS[path[:depth]]
        if depth:
            argv.append(path[depth - 1])
        if depth == len(path):
            for a in parser._actions:
                if isinstance(a, argparse._SubParsersAction):
                    continue
                if not a.option_strings and a.nargs in (None, "+"):
                    argv.append("x")
                elif a.option_strings and a.required:
                    argv += [a.option_strings[-1], "x"]
    return argv


@pytest.mark.parametrize("path", [(), *COMMAND_PATHS], ids=lambda p: " ".join(p) or "main")
def test_help_runs_and_describes_the_command(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('hf-taskarith', *path))}")
    parser = PARSERS[path]
    assert parser.description and parser.description.strip(), f"{path}: no description"
    assert parser.description.split()[0] in out
    if path:
        assert "--no-progress" in out and "-q, --quiet" in out


@pytest.mark.parametrize("path", [(), *COMMAND_PATHS], ids=lambda p: " ".join(p) or "main")
def test_every_argument_has_help_and_shows_its_default(path):
    parser = PARSERS[path]
    formatter = common.HelpFormatter(prog="hf-taskarith")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
            f"{' '.join(path) or 'main'}: {name} has no help"
        shown = formatter._get_help_string(action)
        default = action.default
        if default not in (None, False, argparse.SUPPRESS, [], ()):
            assert "default" in shown, f"{' '.join(path)}: {name} does not show its default {default!r}"
        if "--dtype" in action.option_strings:
            assert action.choices, f"{' '.join(path)}: --dtype is free text"
            assert set(action.choices) <= set(common.DTYPE_CHOICES)


def test_the_dtype_choices_are_all_understood():
    from hf_taskarith.merging.api import parse_dtype

    assert all(isinstance(parse_dtype(name), torch.dtype) for name in common.DTYPE_CHOICES)


def test_an_unknown_dtype_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "base", "ft", "out", "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_no_progress_and_quiet_parse_for_every_command(path):
    argv = _minimal_argv(path)
    plain = common.resolve_common_options(build_parser().parse_args(argv))
    assert plain.no_progress is False and plain.quiet is False
    args = common.resolve_common_options(build_parser().parse_args([*argv, "--no-progress", "-q"]))
    assert args.no_progress is True and args.quiet is True
    quiet_only = common.resolve_common_options(build_parser().parse_args([*argv, "--quiet"]))
    assert quiet_only.no_progress is True  # -q hides progress bars too


def test_options_given_to_a_parent_command_survive_the_nested_one():
    args = common.resolve_common_options(build_parser().parse_args(["hub", "-q", "serve", "--root", "r"]))
    assert args.quiet is True and args.no_progress is True


def test_quiet_wins_over_verbose():
    parser = build_parser()
    assert common.log_level(parser.parse_args(["-v", "methods"])) == logging.INFO
    assert common.log_level(parser.parse_args(["-v", "methods", "-q"])) == logging.WARNING
    assert common.log_level(parser.parse_args(["methods"])) == logging.WARNING


def test_no_progress_is_switched_off_only_while_the_command_runs(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.delenv(common.PROGRESS_ENV, raising=False)
    args = common.resolve_common_options(build_parser().parse_args(["methods", "--no-progress"]))
    with common.common_settings(args):
        assert os.environ[common.PROGRESS_ENV] == "1" and are_progress_bars_disabled()
    assert common.PROGRESS_ENV not in os.environ
    assert main(["methods", "--no-progress", "-q"]) == 0
    assert common.PROGRESS_ENV not in os.environ


def test_compress_states_its_defaults_and_checks_the_output_first(tmp_path, capsys):
    from hf_taskarith.compression.codecs import CODECS

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {CODECS['topk'].defaults['density']})" in out
    assert f"(default: {CODECS['lowrank'].defaults['rank_fraction']})" in out

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("keep me")
    # the input does not exist either: the output is checked first, before any work
    assert main(["compress", str(tmp_path / "missing_tv"), str(taken)]) == 1
    err = capsys.readouterr().err
    assert "existing folder" in err and "--overwrite" in err and "missing_tv" not in err
    assert (taken / "file.txt").read_text() == "keep me"


def test_compress_runs_with_no_progress(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    TaskVector({"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}).save_pretrained(
        tmp_path / "tv")
    assert main(["compress", str(tmp_path / "tv"), str(tmp_path / "small"), "--method", "sign",
                 "--no-progress", "-q"]) == 0
    assert "smaller than float32" in capsys.readouterr().out
    assert TaskVector.from_pretrained(tmp_path / "small").metadata.extra["compression"]["method"] == "sign"


def test_demo_negation_objective_reaches_the_config():
    from hf_taskarith.cli.demo import build_config

    args = build_parser().parse_args(["demo", "--negation-objective", "chance_distance", "--negate", "trec"])
    config = build_config(args)
    assert (config.negation_objective, config.negate) == ("chance_distance", "trec")
    assert build_config(build_parser().parse_args(["demo"])).negation_objective == "accuracy"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--negation-objective", "loss"])
