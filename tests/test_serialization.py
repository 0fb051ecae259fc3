"""``jax.export`` without source locations (faxbridge/_src/serialization.py): the bytes depend on the
program only, and JAX reads them back and runs them like its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from faxbridge._src import serialization

X = np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3)


def _defined_in(file_name: str, line: int):
  """The same function, as if written at ``file_name:line``."""
  source = "\n" * line + "def fn(x):\n  return jnp.tanh(x) @ x.T + jnp.sum(x)\n"
  scope = {"jnp": jnp}
  exec(compile(source, file_name, "exec"), scope)
  return scope["fn"]


def test_the_bytes_do_not_depend_on_where_the_program_was_written():
  a = serialization.export(_defined_in("/one/checkout/model.py", 3), X)
  b = serialization.export(_defined_in("/another/place/train.py", 40), X)
  assert a.mlir_module_serialized == b.mlir_module_serialized
  # JAX's own artifact records where the function was written, and so differs.
  plain = [jax.export.export(jax.jit(_defined_in(f, 1)))(X) for f in ("/x/a.py", "/y/b.py")]
  assert plain[0].mlir_module_serialized != plain[1].mlir_module_serialized
  assert "model.py" not in a.mlir_module()


def test_jax_reads_the_artifact_back_and_runs_it():
  fn = _defined_in("/somewhere/f.py", 1)
  exported = serialization.export(fn, X)
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_allclose(restored.call(X), np.tanh(X) @ X.T + X.sum(), rtol=1e-6)
