"""Test setup: force several CPU devices before JAX starts, point tfds at the offline copy."""

import os
import pathlib
import tempfile

# Must happen before jax initialises its backends: pmap tests need >= 2 local devices.
NUM_TEST_DEVICES = 4
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}").strip()
# Tiny models compile far longer than they run: LLVM's optimisations off (XLA's own HLO
# passes, fusion included, still run) take a quarter off the suite; run.py is unaffected.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 4 devices on 2 shared cores: a step's collectives may wait for a starved device longer
# than XLA's default 60 s; vq's limits (vq/cpu/devices.py), as run.py sets them.
from vq.cpu import devices as _cpu_devices  # pylint: disable=g-import-not-at-top,wrong-import-position

_cpu_devices.add_collective_timeouts()
# Tests (and the run.py subprocesses they start, which inherit the environment) compile
# the same smoke steps many times: a persistent compilation cache shares the work.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"vq-tests-jax-cache-{os.getuid()}"))

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "data" / "tfds"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
  os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)

# Property tests draw the same examples on every run (a CI failure reproduces exactly, and
# a run never depends on luck); the examples are still generated, not hand-picked.
import hypothesis  # pylint: disable=g-import-not-at-top,wrong-import-position

hypothesis.settings.register_profile("vq", derandomize=True, database=None)
hypothesis.settings.load_profile("vq")
