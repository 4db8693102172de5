"""Run the server: load the model(s), build the app, and hand it to uvicorn until Ctrl-C / SIGTERM.

uvicorn's own signal handling gives the graceful stop: it stops accepting connections, lets in-flight
requests (streams included) finish for up to ``graceful_timeout`` seconds, then runs the app's shutdown
(worker threads joined).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, check_options
from lowbit.models.base import DualEncoder
from lowbit.models.llava_model import LlavaModel
from lowbit.workflows.load import load
from lowbit.workflows.serve.app import Guard, create_app
from lowbit.workflows.serve.limits import Limits

LIMIT_OPTIONS = tuple(f.name for f in fields(Limits))


def model_name(model: str | DualEncoder) -> str:
    """The id a model is served under: its name or directory name (``source["name"]`` for loaded models)."""
    if isinstance(model, str):
        return Path(model).name if Path(model).is_dir() else model
    return str(getattr(model, "source", {}).get("name") or type(model).__name__)


def build_app(model: str | DualEncoder, compare: str | DualEncoder | None = None, **options: Any) -> Guard:
    """The app for ``model`` (and ``compare`` beside it); ``options`` are ``Limits`` fields."""
    check_options("serve", options, LIMIT_OPTIONS)
    limits = Limits(**options)
    first = model if isinstance(model, DualEncoder) else load(model)
    models = {model_name(model): first}
    pair = None
    if compare is not None:
        other = compare if isinstance(compare, DualEncoder) else load(compare)
        name = model_name(compare)
        if name in models:
            name += "-compare"
        if isinstance(other, LlavaModel) != isinstance(first, LlavaModel):
            raise LowbitError(f"--compare needs two models of one kind (two generative or two dual encoders); "
                              f"received {first.family!r} and {other.family!r}")
        models[name] = other
        pair = (model_name(model), name)
    return create_app(models, limits, compare=pair)


def serve(model: str | DualEncoder, compare: str | DualEncoder | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", graceful_timeout: float = 30.0, **options: Any) -> None:
    """Serve ``model`` over HTTP until interrupted (see ``lowbit.workflows.serve.app`` for the routes)."""
    import uvicorn

    app = build_app(model, compare, **options)
    print(f"lowbit serve: {', '.join(app.app.state.backends)} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; SIGTERM is how service
    # managers ask for a stop, so after that clean shutdown the process exits 0 rather than dying of the signal.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_zero) if main else None
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                    access_log=False)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _exit_zero(signum: int, frame: Any) -> None:
    raise SystemExit(0)
