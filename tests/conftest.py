"""Test set-up: 8 forced CPU devices, so sharding is really exercised."""

import os
import sys

# Must happen before jax is imported anywhere. The tests' programs are tiny:
# LLVM's optimisation level 0 halves XLA's CPU compile time, which is most
# of the suite's time, and does not change results.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8'
    ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

# grain worker processes read absl flags: parse them outside absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  """A fresh copy of configs/unet_shapes_tiny.py (tests may change it)."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  return unet_shapes_tiny.get_config()
