"""Progress events of faxbridge: listen to what the library is doing.

    import faxbridge as fb

    with fb.events.listen(lambda e: print(e.name, e.message)):
      fb.export(process, data, target="tff", out_dir="out")

Every event of this process reaches each listener registered with :func:`listen` while its
``with`` block runs, in the order they happen: tracing and splitting a program, loading a target,
lowering each piece, serializing the native reference, checking an export's files, starting a
runtime, each round on the runtime and natively (``round``, with the fields ``who``,
``computation``, ``round`` and ``rounds``). ``CORE_EVENTS`` lists the core's event names; each
target lists its own in its registry entry (``Target.steps``). Writers of targets and runtimes
emit with ``faxbridge.extend.emit``.
"""

from faxbridge._src.events import CORE_EVENTS, Event, Listener, listen

__all__ = ["CORE_EVENTS", "Event", "Listener", "listen"]
