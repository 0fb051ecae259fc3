"""faxbridge's implementation: private, free to change. The public surface is
``faxbridge`` (``import faxbridge as fb``) and, for writers of targets, runtimes and aggregations,
``faxbridge.extend``."""
