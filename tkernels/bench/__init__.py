"""The machinery behind ``tkernels bench``.

* :mod:`.suites`   shape lists from real models, as data;
* :mod:`.cases`    per-op builders: inputs, the tkernels / torch callables, FLOP and byte counts;
* :mod:`.timing`   CUDA-event timing via ``triton.testing.do_bench`` (or CPU perf_counter);
* :mod:`.roofline` the measured copy bandwidth and matmul throughput the figures are scaled by;
* :mod:`.check`    correctness of every op at benchmark sizes against torch and a float64 reference;
* :mod:`.report`   table, JSON, CSV, Markdown, plots, progress bar and run metadata;
* :mod:`.plan`     the validated configuration, the tasks, the providers and ``--list``;
* :mod:`.runner`   the sweep that ties them together.
"""


class BenchError(Exception):
    """A usage problem (unknown op, dtype, suite, bad shape...): the CLI prints it and exits with 2."""
