"""Which tests share a pytest-xdist worker (``make test`` runs ``--dist loadgroup``).

A test module's module-scoped fixture is one costly run shared by many tests (a subprocess driving
the CLI, a batch on the TFF runner, a Python with 8 devices). Each worker would make its own, so
the tests that use one go to one worker, as an ``xdist_group`` named after their module; tests that
name their own group keep it. Registered by conftest.py (``register``).
"""

from __future__ import annotations

import pytest


class ModuleFixtureGroups:
  """Puts the users of a module's own module-scoped fixtures in one xdist_group."""

  @pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
  def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
    for item in items:
      module = item.getparent(pytest.Module)
      if module is None or item.get_closest_marker("xdist_group"):
        continue
      # _fixtureinfo: pytest's record of the fixtures an item uses (read by plugins such as xdist).
      defs = getattr(item, "_fixtureinfo", None)
      owned = [name for name, found in (defs.name2fixturedefs.items() if defs else ())
               if found and found[-1].scope == "module" and found[-1].baseid == module.nodeid]
      if owned:
        item.add_marker(pytest.mark.xdist_group(module.nodeid))


class GroupIds:
  """Makes --dist loadgroup keep each xdist_group on one worker again.

  pytest-xdist 3.8 marks a grouped test by appending ``@group`` to ``item._nodeid``, which pytest
  9.2 no longer reads (a node's id is ``item._id``, a NodeId): every group was silently spread
  over all workers. This appends the suffix where pytest reads it, after xdist's own hook; with an
  xdist whose suffix shows in ``nodeid`` it does nothing.
  """

  @pytest.hookimpl(trylast=True)
  def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under loadgroup
      return
    from _pytest.nodeid import NodeId

    for item in items:
      names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                      for m in item.iter_markers("xdist_group")})
      if names and "@" not in item.nodeid:
        item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


def register(config: pytest.Config) -> None:
  config.pluginmanager.register(ModuleFixtureGroups(), "faxbridge-module-fixture-groups")
  config.pluginmanager.register(GroupIds(), "faxbridge-xdist-group-ids")
