"""The ``tflite`` target: every piece of the split as a ``.tflite`` model (TFLite builtins only),
plus ``plan.json``; ``export.py`` converts them.

``TARGET`` is its registry entry (the ``faxbridge.targets`` entry point ``tflite``). This module
stays cheap to import: TensorFlow is imported when a piece is converted.
"""

from faxbridge.extend import Option, Target

LOWERINGS = ("tf", "jax2tf")  # how a piece reaches TensorFlow (export.py's docstring compares them)

TARGET = Target(
    "tflite", exporter="faxbridge.converters.tflite.export:export_tflite",
    summary="a TFLite model per piece (builtins only) and plan.json",
    options=(Option("lowering", str, LOWERINGS[0],
                    "how pieces reach TF: faxbridge's own lowering or jax2tf", LOWERINGS),),
    runtimes=("litert",),
    steps=("tflite.import", "tflite.convert"),
    # Clients with their own data sizes: a ragged leaf has a dynamic leading dimension, resized
    # per client by LiteRT (export.py), so one .tflite file serves every size.
    ragged=True)

__all__ = ["LOWERINGS", "TARGET"]
