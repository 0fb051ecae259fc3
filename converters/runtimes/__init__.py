"""Runtimes that execute exports on something other than native XLA, each proving an export equal
to native by execution (``fb.verify``).

The plan runtimes are declared here (``iree``, ``litert``, ``jax``: each runs ``plan.json`` one
piece at a time, ``faxbridge.converters.plan`` orchestrating); TFF's in ``runtimes/tff``. The
declarations reach the registry through the ``faxbridge.runtimes`` entry points of
``pyproject.toml``; this module imports nothing heavy (the runtimes themselves are imported when
they run).
"""

from faxbridge.extend import Runtime

IREE = Runtime(
    "iree", runner="faxbridge.converters.runtimes.iree:verify_run",
    summary="IREE (llvm-cpu, local-task), orchestrated from plan.json",
    install="pip install iree-base-compiler==3.13.0 iree-base-runtime==3.13.0",
    available="faxbridge.converters.runtimes.iree:available")

LITERT = Runtime(
    "litert", runner="faxbridge.converters.runtimes.litert:verify_run",
    summary="LiteRT's builtin kernels, orchestrated from plan.json",
    install="pip install ai-edge-litert",
    available="faxbridge.converters.runtimes.litert:available")

JAX = Runtime(
    "jax", runner="faxbridge.converters.runtimes.jax_export:verify_run",
    summary="jax.export pieces reloaded in a fresh process, orchestrated from plan.json",
    available="faxbridge.converters.runtimes.jax_export:available")

__all__ = ["IREE", "JAX", "LITERT"]
