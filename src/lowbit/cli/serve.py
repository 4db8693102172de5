"""The ``lowbit serve`` verb: an HTTP server for a model (``lowbit.api.serve``).

``register_serve_cli(sub)`` adds it to ``lowbit``'s sub-command parser (one line in ``lowbit.cli``)::

    lowbit serve llava-fashion-hd                      # http://127.0.0.1:8000/
    lowbit serve out/w4 --compare lit-fashion --port 8080
"""

from __future__ import annotations

import argparse
from typing import Any

from lowbit import api


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve MODEL over HTTP: OpenAI-style API (chat, embeddings, classify), metrics and a web page at /."""
    options: dict[str, Any] = {name: getattr(args, name) for name in (
        "max_tokens", "max_queue", "generation_workers", "batch_window_ms", "max_body_bytes")
        if getattr(args, name) is not None}
    api.serve(args.model, compare=args.compare, host=args.host, port=args.port,
              allow_local_files=args.allow_local_files, log_level=args.log_level, **options)


def register_serve_cli(sub: Any) -> None:
    """Add ``serve`` to ``lowbit``'s sub-command parser (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("serve", help=(cmd_serve.__doc__ or "").splitlines()[0], description=cmd_serve.__doc__)
    p.set_defaults(func=cmd_serve)
    p.add_argument("model", help="built-in name (llava-fashion-hd, lit-fashion), a model directory or a packed one")
    p.add_argument("--compare", help="a second model answering beside MODEL on the page (e.g. the float original)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image_url name a file on this machine (file:// or an absolute path)")
    p.add_argument("--max-tokens", type=int, help="most new tokens per chat completion (default 256)")
    p.add_argument("--max-queue", type=int, help="waiting requests per model before 429 (default 64)")
    p.add_argument("--generation-workers", type=int,
                   help="chat completions decoded at once: rows of the batched decode (default 8)")
    p.add_argument("--batch-window-ms", type=float, help="encoder batching window in ms (default 5)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 20 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
