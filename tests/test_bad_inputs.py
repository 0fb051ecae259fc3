"""Issue 17's bad inputs, as a new user meets them: a program in a file of their own, run through the
``faxbridge`` command (a subprocess) or the public API. Each mistake is one faxbridge error naming the
user's file:line (or the export's leaf) and what to write instead; on the command line one line on
stderr and exit code 2, never a traceback.

1. ``faxbridge verify`` of a float64 export runs in 64-bit by itself (the manifest says so);
2. a float64 program exported to ``tflite`` is refused before converting, naming the leaf;
3. ``example_inputs()`` that do not fit the computation are blamed on ``example_inputs``;
4. an invalid ``fb.secure_sum(..., bitwidth=...)`` is a TraceError at the user's line;
5. ``np.asarray(x)`` / ``float(x)`` on a traced value is a TraceError at the user's line.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from test_cli import cli_env, drive  # tests/ is on sys.path under pytest

import faxbridge as fb
from faxbridge._src.export import read_manifest

TIMEOUT_S = 300


def _module(tmp_path: Path, name: str, source: str):
  """``source`` written to ``tmp_path/name.py`` and imported, as a user's own module."""
  path = tmp_path / f"{name}.py"
  path.write_text(textwrap.dedent(source))
  spec = importlib.util.spec_from_file_location(f"bad_inputs_{name}", path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, str(path)


def _line(path: str, marker: str) -> int:
  """The line of ``path`` ending in ``# marker``."""
  found = [i + 1 for i, line in enumerate(Path(path).read_text().splitlines())
           if line.rstrip().endswith(f"# {marker}")]
  assert len(found) == 1, (marker, found)
  return found[0]


def _one_line_exit_2(rc: int, out: str, err: str) -> str:
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


# --- the user's programs ---------------------------------------------------------------------------
PROGRAMS = '''
import jax.numpy as jnp
import numpy as np

import faxbridge as fb


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def step(w, x):
  return fb.mean(fb.map(lambda w, x: jnp.tanh(x @ w).sum(), fb.broadcast(w), x))


def example_inputs():
  return np.zeros((3, 2), np.float32), np.zeros((4, 5, 3), np.float32)


def too_few():  # too_few
  return (np.zeros((3, 2), np.float32),)


def no_clients_axis():  # no_clients_axis
  return np.zeros((3, 2), np.float32), np.float32(1.0)


@fb.computation(in_placements=(fb.CLIENTS,))
def votes(x):
  return fb.secure_sum(x, bitwidth=0)  # bitwidth


def votes_inputs():
  return (np.ones((3, 2), np.int32),)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def server_numpy(w, x):
  m = fb.mean(x)
  return np.asarray(m) * w  # server asarray


def local_float(w, x):
  return float(jnp.sum(x * w))  # client float


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def client_float(w, x):
  return fb.mean(fb.map(local_float, fb.broadcast(w), x))


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def client_numpy(w, x):
  return fb.mean(fb.map(lambda w, x: np.asarray(x) * w, fb.broadcast(w), x))  # client asarray


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def server_float(w, x):
  return w * float(fb.mean(x))  # server float


def scalar_inputs():
  return np.float32(2.0), np.ones((4,), np.float32)
'''


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[str, dict[str, tuple[int, str, str]]]:
  """The commands a user types with the programs above, in one interpreter (test_cli.drive)."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  (tmp / "user_prog.py").write_text(PROGRAMS)
  cases = {
      "inspect-too-few": (tmp, ["inspect", "user_prog:step", "--example-inputs", "too_few"]),
      "export-too-few": (tmp, ["export", "user_prog:step", "--example-inputs", "too_few",
                               "--target", "stablehlo", "-o", tmp / "o"]),
      "inspect-no-clients-axis": (tmp, ["inspect", "user_prog:step", "--example-inputs",
                                        "no_clients_axis"]),
      "secure-sum": (tmp, ["inspect", "user_prog:votes", "--example-inputs", "votes_inputs"]),
      "server-numpy": (tmp, ["inspect", "user_prog:server_numpy", "--example-inputs",
                             "scalar_inputs"]),
      "client-float": (tmp, ["export", "user_prog:client_float", "--example-inputs",
                             "scalar_inputs", "--target", "stablehlo", "-o", tmp / "o2"]),
  }
  return str(tmp / "user_prog.py"), drive(cases, tmp / "results.json")


# --- 1. verify of a float64 export -----------------------------------------------------------------
@pytest.mark.slow  # two fresh processes: the command, and the jax runtime it starts
def test_verify_of_a_float64_export_runs_in_64_bit_without_being_told(tmp_path):
  module, _ = _module(tmp_path, "prog64", """
      import jax.numpy as jnp
      import numpy as np
      import faxbridge as fb


      @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
      def step(params, x):
        return fb.mean(fb.map(lambda p, x: jnp.tanh(x @ p["w1"]).sum(), fb.broadcast(params), x))


      def example_inputs():
        rng = np.random.default_rng(0)
        return {"w1": rng.normal(size=(3, 2))}, rng.normal(size=(4, 5, 3))
      """)
  args = module.example_inputs()
  with jax.enable_x64(True):  # the user exported with JAX_ENABLE_X64=1
    out = fb.export(module.step, *args, target="stablehlo", out_dir=tmp_path / "out64")
  assert {s["dtype"] for s in read_manifest(out)["computation"]["inputs"]} == {"float64"}
  np.savez(tmp_path / "inputs.npz", params_w1=args[0]["w1"], x=args[1])
  env = cli_env()  # JAX_ENABLE_X64 unset, as in a user's new shell
  assert "JAX_ENABLE_X64" not in env
  for how in (["--inputs", "inputs.npz"], ["--program", "prog64:step"]):
    proc = subprocess.run([sys.executable, "-m", "faxbridge", "verify", "out64", "--runtime", "jax",
                           *how], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (how, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines()[-1].startswith("OK: 1 output on jax equals native"), proc.stdout
  # An independent answer: the same round in float64 numpy agrees with what the runtime computed.
  w, x = args[0]["w1"], args[1]
  expected = np.mean([np.tanh(xi @ w).sum() for xi in x])
  from faxbridge._src.verify import run_on_runtime

  with jax.enable_x64(True):
    got = run_on_runtime(out, "jax", {"params_w1": w, "x": x}).outputs["out"]
  np.testing.assert_allclose(got, expected, rtol=1e-12)


# --- 2. a float64 program to tflite -------------------------------------------------------------
def test_float64_to_tflite_is_refused_before_converting_naming_the_leaf(tmp_path):
  module, _ = _module(tmp_path, "tfl64", """
      import jax.numpy as jnp
      import numpy as np
      import faxbridge as fb


      @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
      def step(params, x):
        return fb.mean(fb.map(lambda p, x: (x * p["w1"]).sum(), fb.broadcast(params), x))
      """)
  args = ({"w1": np.ones(3)}, np.ones((4, 3), np.float32))
  with jax.enable_x64(True), pytest.raises(fb.ExportError) as info:
    fb.export(module.step, *args, target="tflite", out_dir=tmp_path / "t64")
  message = str(info.value)
  first = message.splitlines()[0]
  assert "step's input params['w1'] (float64[3], SERVER)" in first
  assert "TFLite's builtin kernels (TFLITE_BUILTINS) have no float64 kernels" in first
  assert "float32" in first and "target stablehlo or tff" in first
  assert "tf.Mul" not in message and "flex op" not in message  # not the converter's dump
  assert not (tmp_path / "t64").exists()


def test_a_float64_value_made_inside_a_float32_program_is_named_at_the_users_line(tmp_path):
  module, path = _module(tmp_path, "inner64", """
      import jax.numpy as jnp
      import numpy as np
      import faxbridge as fb


      def local(w, x):
        return (x.astype(jnp.float64) * w).sum().astype(jnp.float32)  # widened


      @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
      def step(w, x):
        return fb.mean(fb.map(local, fb.broadcast(w), x))
      """)
  with jax.enable_x64(True), pytest.raises(fb.ExportError) as info:
    fb.export(module.step, np.float32(2.0), np.ones((4, 3), np.float32), target="tflite",
              out_dir=tmp_path / "t")
  first = str(info.value).splitlines()[0]
  assert f"a float64 value made by 'convert_element_type' at {path}:{_line(path, 'widened')}" in first
  assert "no float64 kernels" in first


# --- 3. example inputs that do not fit -------------------------------------------------------------
@pytest.mark.parametrize("case,fn,says", [
    ("inspect-too-few", "too_few", "step takes 2 positional arguments (one per entry of "
     "in_placements), got 1. It returned (float32[3,2])"),
    ("export-too-few", "too_few", "got 1. It returned (float32[3,2])"),
    ("inspect-no-clients-axis", "no_clients_axis", "argument 1 of step is CLIENTS-placed, so its "
     "leading axis is the clients axis; got shape (). It returned (float32[3,2], float32[])"),
])
def test_example_inputs_that_do_not_fit_name_example_inputs_not_the_command(cli_runs, case, fn,
                                                                           says):
  path, runs = cli_runs
  line = _one_line_exit_2(*runs[case])
  assert f"PlacementError: the example inputs user_prog.{fn}() returned (defined at " \
         f"{path}:{_line(path, fn)}) do not fit step" in line
  assert says in line
  assert "step takes (w: SERVER, x: CLIENTS)" in line
  assert "bin/faxbridge" not in line and "<string>" not in line and "cli.py" not in line


# --- 4. secure_sum's bitwidth ----------------------------------------------------------------------
@pytest.mark.parametrize("bitwidth", [0, 63, 65, -1, 2.5, "8", True, None])
def test_invalid_bitwidth_is_a_trace_error_at_the_users_line(tmp_path, bitwidth):
  module, path = _module(tmp_path, "bits", f"""
      import faxbridge as fb


      @fb.computation(in_placements=(fb.CLIENTS,))
      def votes(x):
        return fb.secure_sum(x, bitwidth={bitwidth!r})  # the call
      """)
  with pytest.raises(fb.TraceError) as info:
    module.votes(np.ones((3, 2), np.int32))
  message = str(info.value)
  assert f"fb.secure_sum at {path}:{_line(path, 'the call')} (votes)" in message
  assert "bitwidth must be a Python int in [1, 62]" in message and f"got {bitwidth!r}" in message


@pytest.mark.parametrize("bitwidth", [1, 8, 62, np.int32(8)])
def test_a_valid_bitwidth_sums(bitwidth):
  votes = fb.computation(lambda x: fb.secure_sum(x, bitwidth=bitwidth), in_placements=(fb.CLIENTS,))
  x = np.array([[1, 0], [1, 1], [0, 1]], np.int32)
  np.testing.assert_array_equal(votes(x), x.sum(axis=0))


def test_invalid_bitwidth_on_the_command_line_is_one_line(cli_runs):
  path, runs = cli_runs
  line = _one_line_exit_2(*runs["secure-sum"])
  assert f"TraceError: fb.secure_sum at {path}:{_line(path, 'bitwidth')} (votes)" in line


# --- 5. a traced value made concrete ------------------------------------------------------------
@pytest.mark.parametrize("name,marker,says,fix", [
    ("server_numpy", "server asarray", "converted to a numpy array", "jax.numpy"),
    ("client_numpy", "client asarray", "converted to a numpy array", "jax.numpy"),
    ("client_float", "client float", "converted to a Python number", "JAX array"),
    ("server_float", "server float", "converted to a Python number", "JAX array"),
])
def test_a_traced_value_made_concrete_is_a_trace_error_at_the_users_line(tmp_path, name, marker,
                                                                        says, fix):
  module, path = _module(tmp_path, "concrete", PROGRAMS)
  with pytest.raises(fb.TraceError) as info:
    getattr(module, name)(*module.scalar_inputs())
  message = str(info.value)
  assert message.startswith(f"{name}: a traced value is {says} (")
  assert f") at {path}:{_line(path, marker)} (" in message
  assert fix in message and "static" in message


@pytest.mark.parametrize("case,marker", [("server-numpy", "server asarray"),
                                         ("client-float", "client float")])
def test_a_traced_value_made_concrete_on_the_command_line_is_one_line(cli_runs, case, marker):
  path, runs = cli_runs
  line = _one_line_exit_2(*runs[case])
  assert "TraceError: " in line and f"at {path}:{_line(path, marker)}" in line
