"""Every option and argument of ``edge-agent`` and ``edge-controller`` has help text.

Walks both argparse trees (every subcommand, nested ones included) and lists
what ``--help`` would show without a description.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from agent.cli import build_parser as agent_parser
from agent.controller.cli import build_parser as controller_parser


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield f"{path} {name}", argparse.Action([name], name, help=helps.get(name))
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def _missing(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    missing = []
    for path, action in _walk(parser, prog):
        text = action.help
        if text is None or text == argparse.SUPPRESS or not str(text).strip():
            name = "/".join(action.option_strings) or action.metavar or action.dest
            missing.append(f"{path}: {name}")
    return missing


@pytest.mark.parametrize(
    ("prog", "build"), [("edge-agent", agent_parser), ("edge-controller", controller_parser)]
)
def test_every_option_and_subcommand_has_help(prog: str, build: object) -> None:
    assert callable(build)
    parser = build()
    assert isinstance(parser, argparse.ArgumentParser)
    assert _missing(parser, prog) == []


def test_the_walk_sees_nested_subcommands() -> None:
    # pki's own subcommands are two levels down: the walk must reach them.
    paths = {path for path, _ in _walk(controller_parser(), "edge-controller")}
    assert "edge-controller pki mosquitto" in paths
