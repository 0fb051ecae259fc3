"""The TFF runner: executes exported artifacts in .venv-tff (TFF 0.87, TF 2.14, numpy 1.25).

The files it reads and writes, its command line, status and exit codes are specified once, in
``docs/tff_runner_protocol.md``; the core side is ``faxbridge.converters.runtimes.tff``.

This package is self-contained: it imports nothing from faxbridge (whose ``__init__`` needs numpy 2
and modern JAX), only the standard library, numpy, TensorFlow and TFF, and its own modules by
relative import. It is started by path, ``python .../tff/tff_runner ARGS`` (see ``__main__``), so
it is imported as the top-level package ``tff_runner`` and no faxbridge ``__init__`` runs.

Modules, one idea each:

* ``protocol``: the protocol version, ``ProtocolError`` and the npz/JSON file helpers.
* ``processes``: ending TFF's worker_binary (and any other descendant) whatever happens.
* ``values``: TFF arguments built from npz leaves and manifest paths; outputs read back.
* ``graphs``: the ``graph`` subcommand, plain GraphDefs in TF 2.14.
* ``contexts``: TFF's execution contexts (native or test) and how many clients they run.
* ``computations``: the ``computation`` subcommand: export directories loaded and executed.
* ``forms``: MapReduceForm and DistributeAggregateForm built and their rebuilds run.
* ``cli``: the command line, the status file and the exit code.
"""
