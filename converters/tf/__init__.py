"""jaxpr -> plain TensorFlow ops, runnable by TF 2.14 (TFF 0.87), TF 2.21 and the TFLite converter.

``to_tf(fn, *example_args)`` gives a concrete function; ``lower_jaxpr`` / ``jaxpr_to_graph_def``
give the TF1-style graphs the TFF exporter embeds. Rules live in ``rules_*.py``, one family per module,
registered in ``registry``; ``docs.py`` renders the table into ``docs/tf_primitives.md``.
"""

from . import (  # noqa: F401  (importing a rule module registers its rules)
    rules_bitwise,
    rules_control_flow,
    rules_elementwise,
    rules_indexing,
    rules_linalg,
    rules_ragged,
    rules_random,
    rules_reductions,
    rules_structural,
)
from .allowlist import ALLOWED_OPS, check_graph_def
from .api import graph_def_bytes, jaxpr_to_graph_def, lower_jaxpr, strip_default_attrs, to_tf
from .lower import Lowering
from .registry import all_rules, register

__all__ = [
    "ALLOWED_OPS",
    "Lowering",
    "all_rules",
    "check_graph_def",
    "graph_def_bytes",
    "jaxpr_to_graph_def",
    "lower_jaxpr",
    "register",
    "strip_default_attrs",
    "to_tf",
]
