"""The ``tff`` target: federated_language computation protos (byte-compatible with TFF 0.87's),
with plain-TF (default) or XLA local computations; ``export.py`` writes them, ``local.py`` lowers
each piece.

``TARGET`` is its registry entry (the ``faxbridge.targets`` entry point ``tff``). This module stays
cheap to import: federated_language and TensorFlow are imported when the exporter is loaded.
"""

from faxbridge.extend import Demo, Option, Target

LOCAL_FORMS = ("tensorflow", "xla")  # the forms of local computations (local.py builds each)

TARGET = Target(
    "tff", exporter="faxbridge.converters.tff.export:export_tff",
    summary="federated_language computation protos (TFF 0.87), plain-TF or XLA local computations",
    options=(Option("local", str, LOCAL_FORMS[0],
                    "the form of local computations: plain TF graphs (what TFF 0.87 runs) or XLA",
                    LOCAL_FORMS),),
    runtimes=("tff",),
    steps=("tff.import", "tff.lower"),
    versions="faxbridge.converters.tff:versions",
    examples=("faxbridge export examples.fedavg:process --target=tff -o build/fedavg_tff "
              "--save-inputs --force",
              "faxbridge verify build/fedavg_tff --runtime=tff"),
    demo=Demo("faxbridge.examples.fedavg:process", runtime="tff", rounds=5),
    default=True,
    # Clients with their own data sizes: a ragged leaf is a TensorType(dtype, [None, ...]) and its
    # TF placeholder [None, ...] (local.py), so one computation serves every size.
    ragged=True)


def versions() -> dict[str, str]:
  """The manifest's versions that the export's format depends on: federated_language's."""
  import federated_language

  version = federated_language.version
  return {"federated_language": getattr(version, "__version__", None) or str(version)}


__all__ = ["LOCAL_FORMS", "TARGET", "versions"]
