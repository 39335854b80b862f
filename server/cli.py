"""``hpr-serve``: parse flags (every :class:`ServerSettings` field; flags win over ``HPR_*`` env vars), run uvicorn."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from server.settings import ServerSettings


def _is_list(annotation: object) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


_METAVARS = {
    "adapter": "NAME=PATH",
    "adapter_root": "DIR",
    "admin_key": "KEY",
    "api_key": "KEY",
    "api_key_file": "FILE",
    "cors_origin": "ORIGIN",
    "model": "MODEL",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpr-serve",
        description="Serve an LLM, optionally edited by HPR adapters, behind an OpenAI-compatible API. "
        "Every flag can also be set as an environment variable HPR_<NAME> (e.g. HPR_MAX_BATCH_SIZE=16).",
        argument_default=argparse.SUPPRESS,  # unset flags fall through to the environment / defaults
    )
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "") + ("" if default in (None, []) else f" (default: {default})")
        metavar = _METAVARS.get(name, name.upper())
        if _is_list(info.annotation):
            parser.add_argument(flag, dest=name, action="append", metavar=metavar, help=help_text + " Repeatable.")
        elif info.annotation is bool:  # --playground / --no-playground
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=info.description)
        else:
            parser.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**args)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        )
        parser.error(problems)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from server.app import create_app

    settings = parse_settings(argv)
    if settings.malloc_tuning:  # first thing, before any thread has an arena of its own (server.allocator)
        from server.allocator import keep_freed_memory

        keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if settings.log_level == "trace" else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = create_app(settings)
    except ValueError as exc:  # e.g. an unreadable --api-key-file
        print(f"hpr-serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    # Graceful shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and gives running requests
    # --drain-timeout seconds to finish. sse-starlette would otherwise cut every stream at once.
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # server.request_id logs one line per request, with its X-Request-Id
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout)),
    )
    server = uvicorn.Server(config)

    def on_load_failure(_reason: str) -> None:
        server.should_exit = True

    app.state.on_load_failure = on_load_failure
    server.run()
    if app.state.load_error:
        print(f"hpr-serve: startup failed: {app.state.load_error}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
