"""`qwen-api serve`: parse flags and environment through the one settings schema, resolve the model, serve.

The model is resolved before the server starts, so a model that cannot be had fails fast with one line
(exit code 2) instead of a server that is never healthy.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from qwen_api.settings import Settings

USAGE = "usage: qwen-api serve [--model MODEL] [--host HOST] [--port PORT] [...]  (qwen-api serve --help)"


def serve(settings: Settings) -> int:
    import uvicorn

    from qwen_api.admission import Admission
    from qwen_api.api.app import create_app, observe_with
    from qwen_api.api.middleware import RequestIdFilter
    from qwen_api.engine.loading import ModelUnavailable, resolve_model
    from qwen_api.runtime import Runtime, default_loader
    from qwen_api.server import Server, bounded_http, connection_bound

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())  # every line names the request it belongs to, or "-"
    try:
        source = resolve_model(settings.model)
    except ModelUnavailable as exc:
        print(f"qwen-api: {exc}", file=sys.stderr)
        return 2
    runtime: Runtime
    if settings.ray:  # engine replicas on a Ray cluster behind this front
        from qwen_api.cluster.front import create_cluster_app

        runtime, admission, app = create_cluster_app(settings, source)
    else:
        runtime = Runtime(default_loader(settings, source), settings.served_model_name or source.name)
        admission = Admission(settings.admission_capacity())
        app = create_app(settings, runtime, admission)
    http = bounded_http(connection_bound(settings.max_connections), settings.header_timeout)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, http=http)
    server = Server(config, runtime, admission, settings.drain_timeout, cut_off=app.state.guard.cut_off)
    # The runtime's collaborators, built from it: the app's metrics observe what it loads, and the server exits
    # (with the runtime's exit code) when the model fails to load or its engine dies.
    runtime.connect(on_ready=observe_with(app.state.metrics), on_fatal=server.request_exit)
    server.run()
    code = 1 if server.cut_off else runtime.exit_code
    if runtime.skip_teardown:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def setting_errors(exc: Any) -> list[str]:
    """A settings `ValidationError` as one line per bad value, naming its flag and its variable."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        where = f"--{field.replace('_', '-')} (QWEN_API_{field.upper()}): " if field else ""
        given = f" (got {error['input']!r})" if field and "input" in error else ""
        lines.append(f"{where}{error['msg']}{given}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from pydantic import ValidationError

        try:
            # pydantic-settings reads these underscore init arguments at run time; its stubs do not declare them.
            settings = Settings(_cli_parse_args=rest, _cli_prog_name="qwen-api serve")  # type: ignore[call-arg]
        except ValidationError as exc:  # a bad value, from a flag or a variable: one line each, not a traceback
            for line in setting_errors(exc):
                print(f"qwen-api serve: {line}", file=sys.stderr)
            return 2
        return serve(settings)
    print(f"qwen-api: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
