"""Workflows: the pieces that combine packages (models, quant, kernels, eval, train, data) into one job.

One module per job: ``load`` (any model, packed directories included), ``quantize`` (calibrate + quantize_,
save), ``checkpoint`` + ``packed`` (the packed directory format and its family), ``sweep``, ``qat`` (the whole
QAT run), ``bench_kernels`` / ``bench_model``, ``builders`` + ``build_lit`` / ``build_llava`` (re-training the
built-in models' trained parts), ``demo``. ``lowbit.api`` exposes each as a one-liner; nothing below this
layer imports it (``tools/import_graph.py`` checks).
"""
