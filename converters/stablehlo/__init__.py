"""The ``stablehlo`` target: every piece of the split as StableHLO (text, portable artifact) and
``jax.export``, plus ``plan.json``; ``export.py`` writes them.

``TARGET`` is its registry entry (the ``faxbridge.targets`` entry point ``stablehlo``).
"""

from faxbridge.extend import Option, Target

TARGET = Target(
    "stablehlo", exporter="faxbridge.converters.stablehlo.export:export_stablehlo",
    summary="a StableHLO module per piece and plan.json",
    options=(Option("stablehlo_version", str, "week_12",
                    "the version of the portable artifacts: week_12, week_4, max (the oldest), "
                    "none (the current one) or X.Y.Z"),),
    runtimes=("iree", "jax"),
    ragged=True,
    steps=("stablehlo.lower",),
    examples=("faxbridge export examples.two_stage:computation --target=stablehlo -o "
              "build/two_stage --force",
              "faxbridge verify build/two_stage --runtime=iree --program "
              "examples.two_stage:computation"))

__all__ = ["TARGET"]
