"""The ``micrograd-rpc`` command: ``serve`` starts the gradient service.

Other subcommands come from their own packages through one small interface:
``micrograd.client.cli.add_eval_parser(subparsers)`` registers ``eval`` and
sets its ``func`` default; when that package is not importable, ``eval`` is
simply absent. Every subcommand's ``func(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from micrograd import __version__

from . import config

__all__ = ["build_parser", "main"]

_PLUGINS = (
    ("micrograd.client.cli", "add_eval_parser"),
    ("micrograd.client.cli", "add_health_parser"),
    ("micrograd.client.draw", "add_draw_parser"),
)
"""Subcommands defined elsewhere: (module, function that adds its subparser)."""


def _serve(args: argparse.Namespace) -> int:
    """Run ``serve``: settings from flags and environment, then the server until stopped."""
    # gRPC's C core writes its own plain-text lines to stderr; the log is JSON lines only
    # (errors reach the log as Python exceptions). GRPC_VERBOSITY set by the operator wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from .app import run

    try:
        settings = config.from_sources(args)
        return run(settings)
    except config.SettingsError as exc:
        print(f"micrograd-rpc serve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"micrograd-rpc serve: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``micrograd-rpc`` with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="micrograd-rpc",
        description="A micrograd-compatible autograd engine served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the gradient service",
        description=(
            "Serve micrograd.v1.GradientService, grpc.health.v1.Health and server reflection. "
            f"Every flag can also be set by an environment variable {config.ENV_PREFIX}<FLAG> "
            "(upper case, underscores); flags win. SIGTERM or SIGINT shuts down gracefully."
        ),
    )
    config.add_arguments(serve)
    serve.set_defaults(func=_serve)
    for module_name, adder in _PLUGINS:
        try:
            module = importlib.import_module(module_name)
            getattr(module, adder)(commands)
        except (ImportError, AttributeError):
            continue
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``micrograd-rpc`` and ``python -m micrograd.server``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))
