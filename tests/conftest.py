"""Test setup: force several CPU devices before JAX starts, point tfds at the offline copy."""

import os
import pathlib

# Must happen before jax initialises its backends: pmap tests need >= 2 local devices.
NUM_TEST_DEVICES = 4
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED_TFDS = _REPO.parent / "shared" / "data" / "tfds"
if "TFDS_DATA_DIR" not in os.environ and _SHARED_TFDS.is_dir():
  os.environ["TFDS_DATA_DIR"] = str(_SHARED_TFDS)
