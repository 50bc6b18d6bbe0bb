"""The ``cadenza`` command: argument parsing and dispatch, nothing else.

Each command lives beside the code it drives and exposes ``register(groups)``, which adds its
parser to one of the groups below and sets ``func(args, settings) -> int``. Bad input surfaces
as a :class:`~cadenza.errors.CadenzaError` and is printed here as one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cadenza import __version__
from cadenza.errors import CadenzaError

# Modules that contribute commands, imported lazily so `cadenza --help` stays fast.
COMMAND_MODULES = (
    "cadenza.config.cli",
    "cadenza.stream.cli",
    "cadenza.stream.audio_cli",
    "cadenza.models.velocity.cli",
    "cadenza.models.phrase.cli",
    "cadenza.models.vae.cli",
    "cadenza.models.evaluation.cli",
    "cadenza.bench",
    "cadenza.bench.device",
    "cadenza.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadenza", description="Real-time MIDI companion: velocity colorizing and phrase continuation.")
    parser.add_argument("--version", action="version", version=f"cadenza {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (see `cadenza config show`)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")
    root = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {"root": root}
    for name, help_ in (("train", "train a model"), ("eval", "evaluate a model"), ("bench", "measure speed and latency")):
        p = root.add_parser(name, help=help_)
        groups[name] = p.add_subparsers(dest=f"{name}_what", metavar="WHAT", required=True)
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # a command module not present in this build
                continue
            raise
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from cadenza.config.settings import load_settings

    try:
        prepare = getattr(args, "prepare", None)
        if prepare is not None:  # turns command flags into settings overrides
            prepare(args)
        overrides = dict(getattr(args, "overrides", None) or {})
        if args.log_level:
            overrides["log_level"] = args.log_level
        settings = load_settings(args.config, overrides)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        return int(args.func(args, settings) or 0)
    except CadenzaError as exc:
        print(f"cadenza: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # an output folder that is not writable, a disk that is full...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cadenza: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def add_override(args: argparse.Namespace, section: str, key: str, value) -> None:
    """Record a CLI flag as a settings override (applied over env and TOML)."""
    if value is None:
        return
    ov = getattr(args, "overrides", None)
    if ov is None:
        ov = {}
        args.overrides = ov
    ov.setdefault(section, {})[key] = value
