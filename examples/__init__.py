"""Bundled federated programs. Each module defines a computation and ``example_inputs()``.

They are the default inputs of ``faxbridge export``/``verify`` and of the round-trip tests.
"""

EXAMPLES = ("fedavg", "fedsgd", "fedadam", "fedyogi", "analytics", "two_stage", "dp_fedavg",
            "diloco", "branch_train_merge", "papa", "char_lm")
