"""``lowbit serve``: an OpenAI-style HTTP server (FastAPI on uvicorn) and a web page for lowbit models.

- ``app.create_app(models, limits)``: the ASGI app (routes, error format, body-size guard, the page at ``/``)
- ``backends``: what each kind of model answers: generation (llava) in bounded worker threads, embeddings
  and zero-shot classification of dual encoders through ``batching.MicroBatcher`` (one forward per window)
- ``limits``: ``Limits`` and ``ApiError`` (every refusal is a JSON error naming the limit)
- ``images``: data URLs / base64 / (opt-in) local paths to RGB images, with pixel and decode guards
- ``metrics``: counters, gauges and histograms in the Prometheus text format
- ``server.serve``: load the model(s) and run uvicorn until Ctrl-C / SIGTERM (in-flight requests finish)

Importing ``lowbit`` never imports this package: FastAPI is an optional dependency (``lowbit[serve]``).
"""
