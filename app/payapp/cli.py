"""The payapp command line: parses, loads the settings once, calls the core, prints. The only module that prints.

Commands are registered from ``COMMANDS``: each entry is a function ``add_parser(subparsers)`` that adds one
command (or a group) and sets its handler with ``parser.set_defaults(handler=...)``; a handler takes the parsed
arguments and the ``Settings`` and returns the exit code. Adding a command is one import and one entry::

    from payapp.eventcli import COMMANDS as EVENT_COMMANDS
    COMMANDS = [..., *EVENT_COMMANDS]

Every command accepts ``--env-file FILE`` (before or after its name). Errors of the core (``PayappError``) are
printed here, once, with their hint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from payapp import __version__
from payapp.errors import ConfigError, PayappError
from payapp.eventcli import COMMANDS as EVENT_COMMANDS
from payapp.settings import Settings, load_settings, merged_environ

Subparsers = Any  # argparse's _SubParsersAction is private
Handler = Callable[[argparse.Namespace, Settings], int]


def add_migrate(sub: Subparsers) -> None:
    p = sub.add_parser("migrate", help="create or upgrade the database schema (idempotent)",
                       description="Apply the schema migrations not applied yet, with PAYAPP_MIGRATE_DB_URL "
                                   "(falling back to PAYAPP_DB_URL). Running it again changes nothing.")
    p.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.migrate import available, migrate

    applied = migrate(settings.migrate_db_url)
    latest = available()[-1].version if available() else 0
    if applied:
        print(f"applied migrations {', '.join(f'{v:03d}' for v in applied)}; schema at version {latest:03d}")
    else:
        print(f"schema up to date (version {latest:03d})")
    return 0


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="serve the payment API with PAYAPP_WORKERS worker processes",
                       description="Serve the API on PAYAPP_HOST:PAYAPP_PORT with PAYAPP_WORKERS processes sharing "
                                   "the port. SIGTERM drains in-flight requests, then exits.")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.server import serve

    return serve(settings, merged_environ(args.env_file))


def add_merchant(sub: Subparsers) -> None:
    merchant = sub.add_parser("merchant", help="manage merchants and their API keys")
    actions = merchant.add_subparsers(dest="merchant_action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a merchant and print its API key (shown once)",
                                description="Create a merchant and print its new API key on stdout; only its "
                                            "hash is stored. With --rotate-key, replace an existing merchant's key.")
    create.add_argument("--id", dest="merchant_id", required=True, help="merchant id (1-32 characters, no spaces)")
    create.add_argument("--name", default="", help="display name (default: the id)")
    create.add_argument("--rotate-key", action="store_true", help="issue a new key to an existing merchant")
    create.set_defaults(handler=_merchant_create)


def _merchant_create(args: argparse.Namespace, settings: Settings) -> int:
    from payapp.auth import create_merchant

    key = asyncio.run(create_merchant(settings.db_url, args.merchant_id, args.name, rotate=args.rotate_key))
    verb = "has a new API key" if args.rotate_key else "created"
    print(f"merchant {args.merchant_id} {verb}; its API key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


COMMANDS: list[Callable[[Subparsers], None]] = [add_migrate, add_serve, add_merchant, *EVENT_COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payapp", description="The payment service: API, schema, merchants.")
    parser.add_argument("--version", action="version", version=f"payapp {__version__}")
    parser.add_argument("--env-file", metavar="FILE", default=None,
                        help="read PAYAPP_* settings from FILE (the environment wins over it)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        # Also accepted after the command name; SUPPRESS keeps a value given before it.
        command.add_argument("--env-file", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def report(exc: PayappError) -> int:
    print(f"payapp: error: {exc.message}", file=sys.stderr)
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
    if exc.hint:
        print(f"payapp: hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def run(argv: list[str]) -> int:
    """Run payapp with ``argv``; returns the exit code. Tests call this."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        handler: Handler = args.handler
        return handler(args, settings)
    except PayappError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("payapp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        traceback.print_exc()
        print(f"payapp: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 70


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)
