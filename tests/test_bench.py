"""The benchmark: FLOPs counted from the jaxpr (convolutions and matrix
products, torch's convention, scans counted per iteration) and the CLI's
report."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seg_jax import flops

from conftest import REPO


def _conv(x, w, stride=1, dilation=1):
  pad = dilation * (w.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad),) * 2,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_flops_of_convolutions_and_products_forward_and_backward():
  """3x3/2 conv 3->8 on 2x16x16, dilated 3x3/2 conv 8->16 on 8x8, 1x1 as a
  dot 16->5: forward, then the gradient of the kernels (every layer's
  weight gradient costs its forward; the input gradient is needed by all
  but the first layer; a strided layer's input gradient costs its forward,
  not the zeros a transposed convolution inserts)."""
  ks = [jax.ShapeDtypeStruct(s, jnp.float32)
        for s in [(3, 3, 3, 8), (3, 3, 8, 16), (16, 5)]]
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)

  def forward(ks, x):
    y = jax.nn.relu(_conv(x, ks[0], stride=2))  # (2, 8, 8, 8)
    y = jax.nn.relu(_conv(y, ks[1], stride=2, dilation=2))  # (2, 4, 4, 16)
    return jnp.dot(y, ks[2])  # (2, 4, 4, 5)

  f1 = 2 * (2 * 8 * 8) * 8 * (9 * 3)
  f2 = 2 * (2 * 4 * 4) * 16 * (9 * 8)
  f3 = 2 * (2 * 4 * 4) * 5 * 16
  assert flops.count_flops(forward, ks, x) == f1 + f2 + f3
  grad = jax.grad(lambda ks, x: jnp.sum(forward(ks, x) ** 2))
  assert flops.count_flops(grad, ks, x) == 2 * f1 + 3 * f2 + 3 * f3
  # Inside jit, a scan (counted per iteration) and a cond (its costliest
  # branch).
  w = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  v = jax.ShapeDtypeStruct((4, 16), jnp.float32)

  def looped(w, v):
    v, _ = jax.lax.scan(lambda v, _: (jnp.tanh(v @ w), None), v, None,
                        length=7)
    return jax.lax.cond(v[0, 0] > 0, lambda v: v @ w @ w, lambda v: v, v)

  assert flops.count_flops(jax.jit(looped), w, v) == (7 + 2) * 2 * 4 * 16 * 16


def test_flops_of_grouped_convolutions_forward_and_backward():
  """Feature groups (MobileNet's depthwise convolutions): each output
  channel sums over its group's input channels only, forward and in both
  gradients. JAX computes a grouped kernel's gradient as a convolution
  with `batch_group_count`, its input gradient with `feature_group_count`;
  each costs the forward pass (stride 2: not the inserted zeros)."""
  x = jax.ShapeDtypeStruct((2, 16, 16, 12), jnp.float32)
  for groups, out, stride in ((12, 12, 1), (12, 24, 2), (3, 6, 1)):
    w = jax.ShapeDtypeStruct((5, 5, 12 // groups, out), jnp.float32)

    def forward(w, x, groups=groups, stride=stride):
      return jax.lax.conv_general_dilated(
          x, w, (stride, stride), ((2, 2), (2, 2)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=groups)

    size = 16 // stride
    f = 2 * (2 * size * size * out) * 25 * (12 // groups)
    assert flops.count_flops(forward, w, x) == f, groups
    grad = jax.grad(lambda w, x: jnp.sum(forward(w, x) ** 2), (0, 1))
    assert flops.count_flops(grad, w, x) == 3 * f, groups


def test_bilinear_resizing_is_not_counted():
  """`jax.image.resize` (one matrix product per axis inside) is
  interpolation: not counted, forward or backward, jitted or not, as
  torch counts its upsampling; the 1x1 product beside it is."""
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((2, 8, 12, 6), jnp.float32)
  k = jax.ShapeDtypeStruct((6, 5), jnp.float32)
  fn = lambda k, x: layers.resize_bilinear(jnp.dot(x, k), 32, 48)
  product = 2 * (2 * 8 * 12) * 6 * 5
  assert flops.count_flops(fn, k, x) == product
  assert flops.count_flops(jax.jit(jax.grad(
      lambda k, x: jnp.sum(fn(k, x) ** 2))), k, x) == 2 * product
  assert flops.count_flops(lambda x: jax.image.resize(
      x, (2, 4, 6, 6), 'bilinear'), x) == 0


def test_bench_cli_reports_the_step_and_the_input_loop():
  """The tiny config on 8 devices, TensorFlow hidden; --vs-torch without
  torch says why it is skipped, with torch times the U-Net's twin
  (benchmarks/torch_unet.py) beside it; the last line is key=value."""
  out = subprocess.run(
      [sys.executable, 'tests/no_tensorflow.py', '-m', 'seg_jax.bench',
       '--config=configs/unet_shapes_tiny.py', '--steps=2', '--repeats=2',
       '--warmup=1', '--input=both', '--loop_steps=3', '--vs-torch',
       '--config.compilation_cache_dir='],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('unet train, batch 8, 32x32, float32, 8 x ')
  fields = dict(kv.split('=') for kv in lines[-1].split())
  assert list(fields)[:3] == ['images_per_sec', 'mfu', 'peak_gib']
  values = {k: float(v) for k, v in fields.items()}
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('torch') is None:
    assert any(l.startswith('torch: skipped: ') for l in lines), lines
  else:
    eager = next(l for l in lines if l.startswith('torch eager: '))
    busy = re.search(r', ([\d.]+) cores busy;', eager)
    assert busy and float(busy.group(1)) > 0, eager
    np.testing.assert_allclose(
        values['ratio_eager'], values['images_per_sec'] /
        values['torch_eager'], rtol=1e-4)
  np.testing.assert_allclose(values['images_per_sec'],
                             8 / values['step_s'], rtol=1e-4)
  assert 0 < values['mfu'] < 1 and values['peak_gib'] > 0
  assert values['compile_s'] > 0 and values['real_images_per_sec'] > 0
  # The page faults of the timed steps, the host memory setting the CLI
  # started with (seg_jax.host_memory: huge pages on this kind of machine,
  # kept memory where the kernel gives none) and the cores kept busy (CPU
  # time over wall time: some of the cores this process may run on).
  step_line = next(l for l in lines if l.startswith('seg_jax: '))
  mode = re.search(r', (\d+) page faults/step \(host memory: (.*)\), '
                   r'([\d.]+) of (\d+) cores busy$', step_line)
  assert mode and int(mode.group(1)) == round(values['page_faults_per_step'])
  cores = len(os.sched_getaffinity(0))
  assert int(mode.group(4)) == cores
  assert float(mode.group(3)) == round(values['cores_busy'], 2)
  assert 0 < values['cores_busy'] <= cores + 0.1, step_line
  from seg_jax import host_memory  # pylint: disable=g-import-not-at-top
  version, thp = host_memory.glibc_version(), host_memory._thp_mode()  # pylint: disable=protected-access
  plan = host_memory.huge_pages_argv(os.environ, ['python'], 'python',
                                     version, thp)
  started = plan[1] if plan else os.environ
  expected = host_memory._mode(started, version, thp)  # pylint: disable=protected-access
  assert mode.group(2) == expected, step_line
  np.testing.assert_allclose(
      values['real_vs_synthetic'],
      values['real_images_per_sec'] / values['synthetic_loop_images_per_sec'],
      rtol=1e-3)
  # The tiny U-Net's FLOPs, counted in this process for the same step.
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  from seg_jax import bench, sharding  # pylint: disable=g-import-not-at-top
  expected = bench.step_flops(unet_shapes_tiny.get_config(),
                              sharding.create_mesh(), 'train')
  np.testing.assert_allclose(values['flops'], expected, rtol=1e-5)


def test_infer_mode_counts_the_forward_pass(tiny_config):
  """--mode=infer times the sharded forward pass; its FLOPs are the
  summary's per-image forward FLOPs times the batch."""
  from seg_jax import bench, state, summary  # pylint: disable=g-import-not-at-top
  r = bench.benchmark(tiny_config, mode='infer', steps=2, repeats=1,
                      warmup=1)
  model = state.create_model(tiny_config)
  shape = (1, 32, 32, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros(shape)))
  per_image = summary.forward_gflops(model, variables, shape) * 1e9
  np.testing.assert_allclose(r['flops'], 8 * per_image, rtol=1e-9)
  np.testing.assert_allclose(r['images_per_sec'], 8 / r['step_s'])
  assert r['runs_s'] == [r['step_s']] and r['compile_s'] > 0


def test_profile_ops_lists_the_step_operations_and_their_kinds():
  """benchmarks/profile_ops.py on the tiny config (8 devices): the wall
  time, the intra-op threads' CPU time and its untraced part, the top
  operations (each a named operation of the compiled step,
  with its output shape) and per-kind times that add up to the total of
  operations."""
  out = subprocess.run(
      [sys.executable, 'benchmarks/profile_ops.py',
       '--config=configs/unet_shapes_tiny.py', '--steps=2', '--top=5'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  head = re.fullmatch(r'configs/unet_shapes_tiny.py train: ([\d.]+) ms a step '
                      r'\(wall\), ([\d.]+) ms of operations, [\d.]+ ms of '
                      r'runtime events', lines[0])
  assert head, lines[0]
  assert float(head.group(1)) > 0
  threads = re.fullmatch(r'intra-op threads: ([\d.]+) ms of CPU a step, '
                         r'([\d.]+) ms of it outside the traced operations '
                         r"\(XLA's own convolutions, traced at launch only\)",
                         lines[1])
  assert threads, lines[1]
  assert 0 <= float(threads.group(2)) <= float(threads.group(1))
  top = lines[2:lines.index('by kind:')]
  assert len(top) == 5
  for line in top:
    ms, unit, name, shape = line.split()[:4]
    assert float(ms) >= 0 and unit == 'ms' and re.fullmatch(r'[\w.-]+', name)
    assert re.match(r'\(?[a-z]+\d*\[', shape), line
  kinds = [l.split(maxsplit=2) for l in lines[lines.index('by kind:') + 1:]]
  assert {k[2] for k in kinds} <= {
      'YNNPACK products/convolutions', "XLA's convolutions",
      'transposes/copies', 'reductions', 'other elementwise'}
  np.testing.assert_allclose(sum(float(k[0]) for k in kinds),
                             float(head.group(2)), atol=0.05 * len(kinds))


def test_aspp_forms_checks_every_form_against_the_convolution():
  """benchmarks/aspp_forms.py on an odd-sized map with odd channel counts:
  every form's output equals XLA's convolution (the script exits non-zero
  otherwise), one row per form with the four branches and their sum, and
  the bound of the exact products."""
  out = subprocess.run(
      [sys.executable, 'benchmarks/aspp_forms.py', '--size=37',
       '--channels=5', '--features=3', '--repeats=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == ('ASPP branches, batch 1, 37x37, 5 -> 3 channels; ms, '
                      'median of 1')
  assert lines[1].split() == ['form', '1x1', 'rate', '12', 'rate', '24',
                              'rate', '36', 'sum']
  rows = {line.split()[0]: [float(v) for v in line.split()[1:6]]
          for line in lines[2:]}
  assert list(rows) == ['seg_jax', 'xla', 'per-tap', 'winograd', 'rows',
                        'output', 'bound']
  for values in rows.values():
    assert abs(sum(values[:4]) - values[4]) <= 0.25
  assert re.search(r'\(exact products at \d+ GFLOP/s\)$', lines[-1])
  too_small = subprocess.run(
      [sys.executable, 'benchmarks/aspp_forms.py', '--size=36'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert too_small.returncode == 2
  assert '--size must be more than 36' in too_small.stderr


@pytest.mark.torch
def test_aspp_forms_times_torch_beside_the_forms():
  """With --torch, torch's conv2d row follows the bound, the same four
  branches and their sum (torch installed; skipped without it)."""
  pytest.importorskip('torch')
  out = subprocess.run(
      [sys.executable, 'benchmarks/aspp_forms.py', '--size=37',
       '--channels=5', '--features=3', '--repeats=1', '--torch'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.strip().splitlines()[-1].split()
  assert last[0] == 'torch' and len(last) == 6
  values = [float(v) for v in last[1:]]
  assert abs(sum(values[:4]) - values[4]) <= 0.25


@pytest.mark.slow  # five ResNet-50 prefixes compiled: ~16 s here
def test_trunk_stages_prints_a_row_per_side_whose_stages_sum_to_its_total():
  """benchmarks/trunk_stages.py at a small size: seg_jax's row (and torch's
  where torch is installed), five stages and their total."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  sides = ['seg_jax'] + (['torch'] if importlib.util.find_spec('torch')
                         else [])
  out = subprocess.run(
      [sys.executable, 'benchmarks/trunk_stages.py', '--size=32',
       '--repeats=1', *(['--torch'] if len(sides) == 2 else [])],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == ('dilated ResNet-50 trunk (OS 8), batch 1, 32x32; ms, '
                      'median of 1')
  assert lines[1].split() == ['side', 'stem', 'layer1', 'layer2', 'layer3',
                              'layer4', 'total']
  assert [l.split()[0] for l in lines[2:]] == sides
  for line in lines[2:]:
    values = [float(v) for v in line.split()[1:]]
    assert len(values) == 6 and abs(sum(values[:5]) - values[5]) <= 0.3


def test_bench_table_rows_and_medians():
  """benchmarks/bench_table.py: every row names a config that exists and
  arguments `seg_jax.bench` defines; the table shows each figure's median
  over the runs and the ratios' ranges."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  try:
    import bench_table  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  with open(os.path.join(REPO, 'seg_jax', 'bench.py')) as f:
    defined = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", f.read()))
  for _, mode, args in bench_table.ROWS:
    config = [a for a in args if a.startswith('--config=')][0]
    assert os.path.isfile(os.path.join(REPO, config.split('=', 1)[1]))
    names = [a[2:].split('=')[0].replace('-', '_')
             for a in args + bench_table.COMMON
             if not a.startswith('--config')]
    assert set(names) <= defined, set(names) - defined
    assert ('--mode=infer' in args) == (mode == 'infer')
  runs = [{'images_per_sec': v, 'torch_eager': 2.0, 'ratio_eager': v / 2,
           'compile_s': 3.0, 'peak_gib': 0.5, 'cores_busy': 1.9}
          for v in (3.0, 1.0, 2.0)]
  text = bench_table.table({'fcn_resnet50': runs}, 'infer')
  row = text.splitlines()[2]
  assert row == ('| `fcn_resnet50` | 2 | 2 | - | **1.00x** (0.50-1.50) | - '
                 '| 3 | 0.5 | 1.9 |'), row
  assert bench_table.table({'fcn_resnet50': runs}, 'train').count('\n') == 1


def test_the_real_input_loop_is_a_train_mode_option():
  from seg_jax import bench, errors  # pylint: disable=g-import-not-at-top
  bench.check_input_mode('train', 'both')
  bench.check_input_mode('infer', 'synthetic')
  for kind in ('real', 'both'):
    with pytest.raises(errors.ConfigError, match=(
        rf'^--input={kind} times the training loop fed by the input pipeline, '
        r'not the infer step: give it with --mode=train \(the default\), or '
        r'leave --input out.$')):
      bench.check_input_mode('infer', kind)


def test_data_bench_measures_the_configs_dataset_or_says_what_instead(
    tmp_path):
  """The built-in dataset (no data.root) is measured as it is; a file
  dataset whose data.root is missing is measured on synthetic VOC-layout
  pairs, the report's first line saying why."""
  args = ['--workers=0', '--threads=1', '--batches=1', '--warmup=0']
  runs = {}
  for what, extra in (('shapes', []), ('missing', [
      '--config.data.name=folder', f'--config.data.root={tmp_path}/none',
      '--config.model.num_classes=3'])):
    proc = subprocess.run(
        [sys.executable, '-m', 'seg_jax.data.bench',
         '--config=configs/unet_shapes_tiny.py', *args, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[what] = proc.stdout.splitlines()
  assert runs['shapes'][0].startswith('data=shapes crop=(32, 32) ')
  assert re.match(r'^\| 0 \| 1 \| [\d.]+ \|$', runs['shapes'][-1])
  assert runs['missing'][0] == (
      f"synthetic (data.root='{tmp_path}/none' is not a folder): 200 "
      'VOC-layout pairs, 500x375 JPEG + palette PNG, read instead of the '
      "config's dataset")
  assert runs['missing'][1].startswith('data=voc crop=(32, 32) ')
