"""`cadenza config show`."""

from __future__ import annotations

from cadenza.config.settings import to_toml


def register(groups) -> None:
    p = groups["root"].add_parser("config", help="show the effective configuration")
    sub = p.add_subparsers(dest="config_what", metavar="WHAT", required=True)
    show = sub.add_parser("show", help="print the effective configuration as TOML")
    show.set_defaults(func=_show)


def _show(args, settings) -> int:
    print(to_toml(settings), end="")
    return 0
