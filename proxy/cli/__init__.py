"""The `tollgate` command (`proxy.cli:main`): parse the command line, build Settings (the only
place they are built, from TOLLGATE_* and flags), then run the command.

arguments.py: the parser and every flag's value; servers.py: serve, demo and mock-upstream;
operations.py:
the store commands, in keys.py and usage.py; text.py: answers for people; status.py: exit
statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from proxy.cli.arguments import parse_args
from proxy.cli.status import FAILED, USAGE_ERROR, fail
from proxy.config import ConfigError, load_settings

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.command == "serve":
        overrides = {k: getattr(args, k) for k in ("host", "port", "workers")}
    try:
        settings = load_settings(os.environ, overrides)
    except ConfigError as exc:
        return fail(f"tollgate: {exc}", USAGE_ERROR)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    if args.command in ("serve", "demo", "mock-upstream"):
        from proxy.cli import servers

        if args.command == "serve":
            return servers.serve(settings)
        if args.command == "demo":
            return servers.demo(settings, args.host, args.port)
        return servers.mock_upstream(settings, args.host, args.port)
    # The servers log these at startup; a store command says them before anything else, so a
    # misspelled TOLLGATE_REDIS_ULR is named rather than met as "set TOLLGATE_REDIS_URL".
    from proxy.startup import unknown_variable_warning

    for name in settings.unknown_variables:
        print(f"tollgate: warning: {unknown_variable_warning(name)}", file=sys.stderr)
    if not settings.redis_url:
        return fail("tollgate: set TOLLGATE_REDIS_URL to the store the server uses", USAGE_ERROR)
    from proxy.cli.operations import operate

    return asyncio.run(operate(settings, args))


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
        # prometheus-client would take an empty value for multiprocess mode in the working dir.
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    args = parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, so that a closed pipe surfaces inside this `try`
    except BrokenPipeError:
        # The reader went away (`tollgate usage --format jsonl | head -1`): stop quietly, as
        # CPython's documentation on SIGPIPE recommends; stdout goes to /dev/null so that the
        # interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    return status
