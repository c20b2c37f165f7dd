"""The ``sparcomm`` command line: subcommands register themselves with :func:`command`.

Each module in ``_COMMAND_MODULES`` defines its subcommands with the decorator; the
modules are imported only when the CLI runs, so ``import sparcomm`` stays light.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

_COMMAND_MODULES = [
    "sparcomm._cli_info",
    "sparcomm._cli_bench_codecs",
    "sparcomm._cli_bench_allreduce",
    "sparcomm._cli_bench_train",
    "sparcomm.predict",
    "sparcomm._launch",
    "sparcomm.demo",
]

# name -> (help, configure(parser), run(args) -> int)
_COMMANDS: dict[tuple[str, ...], tuple[str, Callable, Callable]] = {}


def command(*name: str, help: str):  # noqa: A002 - mirrors argparse
    """Register ``run(args) -> int`` as subcommand ``name`` (e.g. ``("bench", "codecs")``).

    The decorated function carries a ``configure`` attribute set with
    :func:`arguments` to add its options.
    """

    def register(run: Callable) -> Callable:
        configure = getattr(run, "_configure", lambda parser: None)
        _COMMANDS[name] = (help, configure, run)
        return run

    return register


def arguments(configure: Callable[[argparse.ArgumentParser], None]):
    """Attach an argument-configuring function to a command (apply below ``@command``)."""

    def attach(run: Callable) -> Callable:
        run._configure = configure  # type: ignore[attr-defined]
        return run

    return attach


def build_parser() -> argparse.ArgumentParser:
    for module in _COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="sparcomm", description="Gradient-compression communication layer (MPI)."
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, configure, run) in sorted(_COMMANDS.items()):
        if len(name) == 1:
            sub = top.add_parser(name[0], help=help_text, description=help_text)
        else:
            if name[0] not in groups:
                group_parser = top.add_parser(name[0], help=f"{name[0]} subcommands")
                groups[name[0]] = group_parser.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[name[0]].add_parser(name[1], help=help_text, description=help_text)
        configure(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)
