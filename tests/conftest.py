"""Test set-up: 8 forced CPU devices, so sharding is really exercised."""

import os
import sys

# Must happen before jax is imported anywhere. The tests' programs are tiny
# and XLA's CPU compile time is most of the suite's time: LLVM's
# optimisation level 0 halves it, and XLA's older (LLVM IR) fusion emitters
# instead of its MLIR ones take another 20-30% off (the default run 9:41 ->
# 7:42 on 2 cores; the lraspp_mobilenet_v3_large train step 13.3 -> 9.5 s).
# Neither changes results beyond float rounding. One test runs the train
# and evaluate CLIs with XLA's own defaults (`production_env()`), so the
# flags users run are covered too.
TEST_ONLY_XLA_FLAGS = ('--xla_backend_optimization_level=0',
                       '--xla_cpu_use_fusion_emitters=false')
DEVICES_FLAG = '--xla_force_host_platform_device_count=8'
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), DEVICES_FLAG, *TEST_ONLY_XLA_FLAGS]
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA compilation cache for the whole run, made by the main pytest
# process and inherited by both xdist workers and every CLI process a test
# starts: the same tiny programs are compiled by many tests. It starts empty
# (no state from earlier runs or from ~/.cache) and is removed at the end.
_OWN_CACHE = None
if ('PYTEST_XDIST_WORKER' not in os.environ and
    'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  import tempfile  # pylint: disable=g-import-not-at-top
  _OWN_CACHE = tempfile.mkdtemp(prefix='seg_jax_tests_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

from absl import flags  # noqa: E402

# grain worker processes read absl flags: parse them outside absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1])

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def production_env():
  """This process's environment for a subprocess, with XLA's flags as a
  user runs them (the 8 devices kept, the tests' compile-time flags
  dropped)."""
  flags_ = [f for f in os.environ.get('XLA_FLAGS', '').split()
            if f not in TEST_ONLY_XLA_FLAGS]
  return {**os.environ, 'XLA_FLAGS': ' '.join(flags_)}


@pytest.fixture
def tiny_config():
  """A fresh copy of configs/unet_shapes_tiny.py (tests may change it)."""
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  return unet_shapes_tiny.get_config()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
