"""Step speed, FLOPs, MFU and memory, side by side with torchvision.

    python -m seg_jax.bench --config=configs/deeplabv3_resnet50_voc.py \\
        [--batch=16] [--crop=512,512] [--steps=10] [--repeats=3] \\
        [--mode=train|infer] [--precision=float32|bfloat16] [--vs-torch] \\
        [--input=synthetic|real|both]

Builds the config's model and its jitted train step (the one `main` runs)
on all local devices, compiles it (reporting trace and compile time),
warms up, then times `--repeats` runs of `--steps` steps on a
device-resident synthetic batch, synchronising with the device at the end
of each run. Reports images/s (median run), step time, peak device memory,
FLOPs per step and MFU against a matmul peak measured in the same process
and precision, and the process's page faults per timed step with the host
memory setting it runs with (on a CPU, many faults a step mean the step's
buffers were mapped afresh: see `seg_jax.host_memory`, which every CLI,
this one included, configures first).

FLOPs are model FLOPs counted from the step's jaxpr (`seg_jax.flops`:
convolutions and matrix products, torch's convention, kernel taps that only
meet padding included; a scanned stage counts once per iteration, where
XLA's cost analysis counts a loop body once). With
torch installed, `--vs-torch` runs the torchvision twin of `fcn_resnet50/101`,
`deeplabv3_resnet50/101`, `deeplabv3_mobilenet_v3_large` or
`lraspp_mobilenet_v3_large` (same batch, crop, classes, optimizer, aux head;
channels-last; bf16 autocast on GPU) eagerly and with `torch.compile`, in
this process, and prints both ratios and torch's own FLOP count.

`--input=real` (train mode) times the training loop fed by the config's
input pipeline (as `main` runs it) instead; `both` times it beside the
same loop on the synthetic batch.

The last line is machine-readable:
`images_per_sec=<f> mfu=<f> peak_gib=<f> [torch_eager=<f> torch_compile=<f>
ratio_eager=<f> ratio_compile=<f>] compile_s=<f> ...`.
"""

import importlib.util
import os
import resource
import statistics
import sys
import time

# First, before JAX is imported: the host allocator's settings.
from seg_jax import host_memory  # pylint: disable=g-bad-import-order

if __name__ == '__main__':
  host_memory.configure()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from seg_jax import cli, errors

FLAGS = flags.FLAGS

# torchvision constructors with a seg_jax twin of the same parameters.
TORCH_TWINS = ('fcn_resnet50', 'fcn_resnet101', 'deeplabv3_resnet50',
               'deeplabv3_resnet101', 'deeplabv3_mobilenet_v3_large',
               'lraspp_mobilenet_v3_large')


def _define_flags():
  config_flags.DEFINE_config_file(
      'config', None, f'Configuration file (a configs/*.py). '
      f'{cli.CONFIG_KEYS_HELP}', lock_config=True)
  flags.DEFINE_integer('batch', 0, 'Global batch (0: '
                       'train.global_batch_size).', lower_bound=0)
  flags.DEFINE_list('crop', [], 'Input height,width (default: '
                    'data.crop_size).')
  flags.DEFINE_integer('steps', 10, 'Steps per timed run.', lower_bound=1)
  flags.DEFINE_integer('repeats', 3, 'Timed runs; the median is reported.',
                       lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'Steps run before timing.', lower_bound=0)
  flags.DEFINE_enum('mode', 'train', ['train', 'infer'],
                    'Time the train step or the inference forward pass.')
  flags.DEFINE_enum('precision', '', ['', 'float32', 'bfloat16'],
                    'float32 or bfloat16 (default: train.precision).')
  flags.DEFINE_bool('vs_torch', False, 'Also time the PyTorch twin (the '
                    "torchvision models', or benchmarks/torch_unet.py's "
                    'U-Net), eager and torch.compile (--vs-torch works '
                    'too).')
  flags.DEFINE_bool('torch_compile', True, 'With --vs-torch, also time '
                    'torch.compile.')
  flags.DEFINE_enum('input', 'synthetic', ['synthetic', 'real', 'both'],
                    'Time the step on a device-resident batch, or the '
                    'training loop fed by the real input pipeline, or both.')
  flags.DEFINE_integer('loop_steps', 30, 'Steps per timed loop with '
                       '--input=real/both.', lower_bound=1)
  flags.mark_flags_as_required(['config'])


def configure(config, batch=0, crop=(), precision=''):
  """A copy of `config` with the benchmark's batch, crop and precision."""
  config = config.copy_and_resolve_references()
  config.unlock()
  if batch:
    config.train.global_batch_size = batch
  if crop:
    try:
      crop = tuple(int(c) for c in crop)
    except ValueError:
      crop = ()
    if len(crop) != 2 or min(crop) < 1:
      raise errors.ConfigError('--crop: give height,width in pixels, e.g. '
                               '--crop=512,512.')
    config.data.crop_size = crop
    pad = tuple(config.data.eval_pad_size or ())
    if pad and (pad[0] < crop[0] or pad[1] < crop[1]):
      config.data.eval_pad_size = ()  # no evaluation here; not a conflict
  if precision:
    config.train.precision = precision
  return config


def synthetic_batch(config, rng=0):
  """A host training batch of the config's shapes: random uint8 images,
  labels in [0, C) with 5% ignore, and colour matrices when photometric
  distortion is on."""
  from seg_jax import labels  # pylint: disable=g-import-not-at-top
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(rng)
  n = config.train.global_batch_size // jax.process_count()
  h, w = transforms.pair(config.data.crop_size)
  label = rng.integers(0, config.model.num_classes, (n, h, w)).astype(
      np.uint8)
  label[rng.random((n, h, w)) < 0.05] = labels.ignore_label(config)
  c = config.data.channels
  batch = {'image': rng.integers(0, 256, (n, h, w, c)).astype(np.uint8),
           'label': label}
  if config.data.photometric.enabled:
    colour = np.zeros((n, c, c + 1), np.float32)
    colour[:, :, :c] = np.eye(c) * rng.uniform(0.8, 1.2, (n, 1, 1))
    colour[:, :, c] = rng.uniform(-10, 10, (n, c))
    batch['colour'] = colour
  return batch


def _train_setup(config, mesh):
  """(model, jitted train step, initial train state) as `main` builds
  them (random initialisation)."""
  from seg_jax import optim, state, steps  # pylint: disable=g-import-not-at-top
  model = state.create_model(config)
  tx = optim.create_optimizer(config.train)
  train_state = state.create_train_state(
      model, tx, jax.random.key(config.seed), state.init_input_shape(config),
      mesh, fsdp_min_size=config.mesh.fsdp_min_size,
      ema=config.train.ema_decay > 0)
  return model, steps.make_train_step(
      model, tx, config, mesh,
      jax.tree.map(lambda x: x.sharding, train_state)), train_state


def build(config, mesh, mode):
  """(jitted step, its arguments) for the train step or inference."""
  from seg_jax import inference, sharding  # pylint: disable=g-import-not-at-top
  model, step, train_state = _train_setup(config, mesh)
  batch = sharding.to_global(synthetic_batch(config), mesh)
  if mode == 'train':
    return step, (train_state, batch, jax.random.key(1))
  variables = {'params': train_state.params,
               'batch_stats': train_state.batch_stats}
  # The predict step `predict` and `export` run: whole-image inference.
  step = inference.make_predict_step(model, config, inference.InferenceSpec())
  images = batch['image']
  sizes = jax.device_put(
      np.tile(np.array(images.shape[1:3], np.int32), (images.shape[0], 1)),
      sharding.data_sharding(mesh))
  return step, (variables, images, sizes)


def step_flops(config, mesh, mode):
  """Model FLOPs of one step over the whole batch (`seg_jax.flops`: 2 x
  multiply-adds of convolutions and matrix products, scanned layers counted
  once per iteration)."""
  from seg_jax import flops, inference, optim, state, steps  # pylint: disable=g-import-not-at-top
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top
  model = state.create_model(config)
  tx = optim.create_optimizer(config.train)
  abstract = state.abstract_train_state(config, mesh)
  batch = synthetic_batch_abstract(config)
  with layers.all_taps():  # model FLOPs: padding-only taps count too
    if mode == 'train':
      fn = steps.make_train_step(model, tx, config, mesh)
      return flops.count_flops(fn, abstract, batch, jax.random.key(0))
    variables = {'params': abstract.params,
                 'batch_stats': abstract.batch_stats}
    return flops.count_flops(
        lambda v, x: model.apply(
            v, inference.normalize(x, config.data.mean, config.data.std),
            train=False), variables, batch['image'])


def synthetic_batch_abstract(config):
  """Shapes and dtypes of `synthetic_batch` (global batch)."""
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  n, (h, w) = (config.train.global_batch_size,
               transforms.pair(config.data.crop_size))
  c = config.data.channels
  batch = {'image': jax.ShapeDtypeStruct((n, h, w, c), jnp.uint8),
           'label': jax.ShapeDtypeStruct((n, h, w), jnp.uint8)}
  if config.data.photometric.enabled:
    batch['colour'] = jax.ShapeDtypeStruct((n, c, c + 1), jnp.float32)
  return batch


def matmul_peak(dtype, size=None, repeats=5):
  """FLOP/s of the best of `repeats` chains of square matmuls on device 0
  (8192 on accelerators, 1024 on CPU), in `dtype`."""
  cpu = jax.devices()[0].platform == 'cpu'
  size = size or (1024 if cpu else 8192)
  inner = 4 if cpu else 20
  key = jax.random.key(0)
  a = jax.random.normal(key, (size, size), dtype)
  b = (jax.random.normal(jax.random.fold_in(key, 1), (size, size)) /
       np.sqrt(size)).astype(dtype)  # keeps the chain's scale
  f = jax.jit(lambda a, b: jax.lax.fori_loop(0, inner, lambda _, x: x @ b, a))
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 * inner / best


def peak_memory_gib(compiled):
  """(GiB, source): the device's peak bytes in use where it reports them
  (GPU, TPU), else XLA's estimate for the compiled step (arguments +
  outputs + temporaries - donated aliases)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30, 'device'
  m = compiled.memory_analysis()
  if m is None:
    return float('nan'), 'none'
  total = (m.argument_size_in_bytes + m.output_size_in_bytes +
           m.temp_size_in_bytes - m.alias_size_in_bytes)
  return total / 2**30, 'xla estimate'


def _minor_faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _usage():
  """The process's (page faults, CPU seconds) so far."""
  return _minor_faults(), time.process_time()


def _usage_per_step(start, times, steps):
  """(page faults per timed step, cores kept busy: CPU time over wall
  time) since `start` (`_usage()`), over timed runs of `steps` steps
  whose seconds per step are `times`."""
  faults, cpu = _usage()
  return ((faults - start[0]) / (len(times) * steps),
          (cpu - start[1]) / (sum(times) * steps))


def time_compiled(compiled, args, mode, steps, repeats, warmup):
  """(median seconds per step over `repeats` runs of `steps` steps, each
  run's seconds per step, the process's page faults per timed step, the
  cores it kept busy: its CPU time over the wall time of the timed runs)."""
  if mode == 'train':
    train_state, batch, rng = args

    def run(n):
      nonlocal train_state
      for _ in range(n):
        train_state, m = compiled(train_state, batch, rng)
      jax.block_until_ready((train_state, m))
  else:
    def run(n):
      out = None
      for _ in range(n):
        out = compiled(*args)
      jax.block_until_ready(out)

  run(warmup)
  times = []
  start = _usage()
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(steps)
    times.append((time.perf_counter() - t0) / steps)
  return (statistics.median(times), times,
          *_usage_per_step(start, times, steps))


def time_loop(config, mesh, source_iter, steps, warmup):
  """Seconds per step of the training loop as `train.Trainer` runs it
  (global batch assembly, step, metric accumulation), fed by
  `source_iter` (host batches)."""
  from seg_jax import metrics, sharding  # pylint: disable=g-import-not-at-top
  _, step, train_state = _train_setup(config, mesh)
  acc = metrics.Accumulator(config.model.num_classes)
  rng = jax.random.key(1)
  pixels = int(np.prod(synthetic_batch(config)['label'].shape))

  def run(n):
    nonlocal train_state, acc
    for _ in range(n):
      batch = sharding.to_global(next(source_iter), mesh)
      train_state, m = step(train_state, batch, rng)
      acc.add(m, pixels)
    acc.result()  # reads the metrics back, as logging does
    jax.block_until_ready(train_state)
    acc = metrics.Accumulator(config.model.num_classes)

  run(warmup)
  t0 = time.perf_counter()
  run(steps)
  return (time.perf_counter() - t0) / steps


def real_iterator(config):
  """The training input pipeline `main` builds, as an iterator."""
  from seg_jax import data  # pylint: disable=g-import-not-at-top
  from seg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  local = config.train.global_batch_size // jax.process_count()
  ds = pipeline.create_train_dataset(
      data.create_source(config, 'train'), pipeline.train_transform(config),
      seed=config.seed, batch_size=local,
      worker_count=config.data.worker_count,
      num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  return iter(ds)


def _repeat(batch):
  while True:
    yield batch


# --- torchvision twin -----------------------------------------------------


def torch_flops(model, images, labels, loss_fn):
  """FLOPs torch counts for one forward + backward of `model`, a grouped
  convolution's kernel gradient counted once (`_conv_backward_flops`)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  with FlopCounterMode(display=False, custom_mapping={
      torch.ops.aten.convolution_backward: _conv_backward_flops}) as counter:
    loss_fn(model(images), labels).backward()
  model.zero_grad(set_to_none=True)
  return float(counter.get_total_flops())


def torch_infer_flops(model, images):
  """FLOPs torch counts for one forward of `model` in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    model(images)
  return float(counter.get_total_flops())


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride,
                         padding, dilation, transposed, output_padding,
                         groups, output_mask, out_shape=None, **kwargs):
  """torch's `convolution_backward` formula (torch.utils.flop_counter,
  which passes shapes), its kernel gradient divided by `groups`: torch
  2.14 counts that gradient as an ungrouped convolution over the
  transposed input, `groups` times its products (960x for MobileNetV3's
  widest depthwise convolution). The input gradient's count is right."""
  del bias, stride, padding, dilation, output_padding, kwargs
  from torch.utils.flop_counter import conv_flop_count  # pylint: disable=g-import-not-at-top
  t = lambda shape: [shape[1], shape[0], *shape[2:]]
  flops = 0
  if output_mask[0]:
    flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0],
                             not transposed)
  if output_mask[1]:
    lhs, rhs = ((grad_out_shape, x_shape) if transposed else
                (x_shape, grad_out_shape))
    flops += conv_flop_count(t(lhs), t(rhs), t(out_shape[1])) // groups
  return flops


# The U-Net's twin: plain torch code beside the package, in a source
# checkout (benchmarks/ is not installed).
TORCH_UNET = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks', 'torch_unet.py')


def _twin_model(config, mode='train'):
  """The torch twin module of `config`'s model, or a reason it has none.

  For inference (`mode='infer'`) the twin has no aux head: torchvision's
  models run theirs in eval mode too (6% more FLOPs and 11% more time for
  `deeplabv3_resnet50` at 512x512), where seg_jax's predict step, like a
  deployed model, computes the main head alone."""
  import torchvision  # pylint: disable=g-import-not-at-top
  name, kwargs = config.model.name, dict(config.model.kwargs)
  if name == 'unet':
    if not os.path.isfile(TORCH_UNET):
      return f'the U-Net twin is {TORCH_UNET}, in a source checkout'
    spec = importlib.util.spec_from_file_location('torch_unet', TORCH_UNET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create(config.model.num_classes, kwargs)
  if name not in TORCH_TWINS:
    return (f'{name} has no torch twin (only unet and '
            f'{", ".join(TORCH_TWINS)})')
  if 'mobilenet' in name:
    if kwargs.get('width', 1.0) != 1.0:
      return f'torchvision builds width 1.0; model.kwargs={kwargs}'
  elif kwargs.get('output_stride', 8) != 8 or kwargs.get('width', 64) != 64 or (
      kwargs.get('multi_grid')):
    return ('torchvision builds output stride 8, width 64, no multi-grid; '
            f'model.kwargs={kwargs}')
  aux = ({'aux_loss': True} if kwargs.get('aux_head') and mode == 'train'
         else {})  # lraspp: none
  return getattr(torchvision.models.segmentation, name)(
      weights=None, weights_backbone=None, num_classes=config.model.num_classes,
      **aux)


def torch_twin(config, mode='train'):
  """(model, images, labels, loss_fn, optimizer, autocast dtype, device) of
  the torch twin of `config` (torchvision's, or the U-Net's) for `mode`
  (`_twin_model`), or a reason it has none."""
  import torch  # pylint: disable=g-import-not-at-top
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  model = _twin_model(config, mode)
  if isinstance(model, str):
    return model
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = model.to(device).to(memory_format=torch.channels_last)
  n, (h, w) = (config.train.global_batch_size,
               transforms.pair(config.data.crop_size))
  g = torch.Generator().manual_seed(0)
  images = torch.randn(n, 3, h, w, generator=g).to(device).to(
      memory_format=torch.channels_last)
  labels = torch.randint(0, config.model.num_classes, (n, h, w),
                         generator=g).to(device)
  weights = tuple(config.train.class_weights)
  ce = torch.nn.CrossEntropyLoss(
      ignore_index=config.data.ignore_label,
      weight=torch.tensor(weights, device=device) if weights else None)
  weight = config.train.aux_loss_weight

  def loss_fn(out, labels):
    loss = ce(out['out'], labels)
    if 'aux' in out:
      loss = loss + weight * ce(out['aux'], labels)
    return loss

  t = config.train
  if t.optimizer == 'sgd':
    opt = torch.optim.SGD(model.parameters(), lr=t.learning_rate,
                          momentum=t.momentum, weight_decay=t.weight_decay)
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate,
                            weight_decay=t.weight_decay)
  amp = (torch.bfloat16 if config.train.precision == 'bfloat16' and
         device == 'cuda' else None)
  return model, images, labels, loss_fn, opt, amp, device


def torch_bench(config, mode, steps, repeats, warmup, compile_too=True):
  """{'eager': img/s, 'compile': img/s, 'flops': FLOPs per step, 'peak_gib',
  'compile_s', 'eager_faults': page faults per eager step, 'eager_busy':
  cores kept busy in the eager steps} of the torchvision twin, or
  {'skipped': reason}."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {'skipped': 'torch is not installed (pip install torch '
                       'torchvision)'}
  twin = torch_twin(config, mode)
  if isinstance(twin, str):
    return {'skipped': twin}
  model, images, labels, loss_fn, opt, amp, device = twin
  n = images.shape[0]
  result = {}
  if mode == 'train':
    model.train()
    result['flops'] = torch_flops(model, images, labels, loss_fn)
  else:
    model.eval()
    result['flops'] = torch_infer_flops(model, images)

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  def make_step(m):
    def train_step():
      with torch.autocast(device, dtype=amp, enabled=amp is not None):
        loss = loss_fn(m(images), labels)
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step():
      with torch.autocast(device, dtype=amp, enabled=amp is not None):
        return m(images)['out'].argmax(1)
    return train_step if mode == 'train' else infer_step

  def measure(step):
    """(images/s of the median run, page faults per timed step, cores
    kept busy)."""
    for _ in range(warmup):
      step()
    sync()
    times = []
    start = _usage()
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        step()
      sync()
      times.append((time.perf_counter() - t0) / steps)
    return (n / statistics.median(times),
            *_usage_per_step(start, times, steps))

  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  result['eager'], result['eager_faults'], result['eager_busy'] = measure(
      make_step(model))
  if device == 'cuda':
    result['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
  if compile_too:
    compiled = torch.compile(model)
    step = make_step(compiled)
    t0 = time.perf_counter()
    step()
    sync()
    result['compile_s'] = time.perf_counter() - t0
    result['compile'] = measure(step)[0]
  return result


# --- the CLI --------------------------------------------------------------


def benchmark(config, mode='train', steps=10, repeats=3, warmup=2):
  """Compiles and times the step of `config`; returns a dict of results."""
  from seg_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
  sharding.check_batch_size(config.train.global_batch_size, mesh)
  fn, args = build(config, mesh, mode)
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  seconds, runs, faults, busy = time_compiled(compiled, args, mode, steps,
                                              repeats, warmup)
  peak, peak_source = peak_memory_gib(compiled)
  flops = step_flops(config, mesh, mode)
  dtype = jnp.bfloat16 if config.train.precision == 'bfloat16' else jnp.float32
  matmul = matmul_peak(dtype) * len(jax.devices())
  n = config.train.global_batch_size
  return {'images_per_sec': n / seconds, 'step_s': seconds, 'runs_s': runs,
          'page_faults_per_step': faults, 'cores_busy': busy,
          'trace_s': t1 - t0, 'compile_s': t2 - t1, 'peak_gib': peak,
          'peak_source': peak_source, 'flops': flops,
          'matmul_peak': matmul, 'mfu': flops / seconds / matmul}


def check_input_mode(mode, input_kind):
  """`--input=real|both` times the training loop: refused with another
  --mode, whose step it would not time."""
  if input_kind != 'synthetic' and mode != 'train':
    raise errors.ConfigError(
        f'--input={input_kind} times the training loop fed by the input '
        f'pipeline, not the {mode} step: give it with --mode=train (the '
        'default), or leave --input out.')


def main(argv):
  del argv
  check_input_mode(FLAGS.mode, FLAGS.input)
  cli.enable_compilation_cache(FLAGS.config.compilation_cache_dir)
  config = configure(FLAGS.config, FLAGS.batch, FLAGS.crop, FLAGS.precision)
  from seg_jax import validate  # pylint: disable=g-import-not-at-top
  validate.check_config(config, training=FLAGS.mode == 'train')
  dev = jax.devices()[0]
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  h, w = transforms.pair(config.data.crop_size)
  print(f'{config.model.name} {FLAGS.mode}, batch '
        f'{config.train.global_batch_size}, {h}x{w}, '
        f'{config.train.precision}, {len(jax.devices())} x '
        f'{dev.device_kind} ({dev.platform}), jax {jax.__version__}',
        flush=True)
  extra = {}
  if FLAGS.input in ('real', 'both'):
    from seg_jax import sharding  # pylint: disable=g-import-not-at-top
    mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axes)
    n = config.train.global_batch_size
    real = time_loop(config, mesh, real_iterator(config), FLAGS.loop_steps,
                     FLAGS.warmup)
    print(f'loop, real input:      {n / real:8.2f} img/s '
          f'({real:.3f} s/step)', flush=True)
    extra['real_images_per_sec'] = n / real
    if FLAGS.input == 'both':
      synth = time_loop(config, mesh, _repeat(synthetic_batch(config)),
                        FLAGS.loop_steps, FLAGS.warmup)
      print(f'loop, synthetic input: {n / synth:8.2f} img/s '
            f'({synth:.3f} s/step); real/synthetic = {synth / real:.3f}',
            flush=True)
      extra['synthetic_loop_images_per_sec'] = n / synth
      extra['real_vs_synthetic'] = synth / real
  r = benchmark(config, FLAGS.mode, FLAGS.steps, FLAGS.repeats, FLAGS.warmup)
  print(f'compile: trace+lower {r["trace_s"]:.1f} s, compile '
        f'{r["compile_s"]:.1f} s')
  print(f'seg_jax: {r["images_per_sec"]:.2f} img/s, {r["step_s"] * 1e3:.1f} '
        f'ms/step (runs: {", ".join(f"{t * 1e3:.1f}" for t in r["runs_s"])}'
        f' ms), peak {r["peak_gib"]:.2f} GiB ({r["peak_source"]}), '
        f'{r["page_faults_per_step"]:.0f} page faults/step (host memory: '
        f'{host_memory.MODE}), {r["cores_busy"]:.2f} of '
        f"{len(os.sched_getaffinity(0))} cores busy")
  print(f'FLOPs/step {r["flops"] / 1e12:.4g} T; matmul peak '
        f'{r["matmul_peak"] / 1e12:.2f} TFLOP/s; MFU {r["mfu"]:.1%}',
        flush=True)
  fields = {'images_per_sec': r['images_per_sec'], 'mfu': r['mfu'],
            'peak_gib': r['peak_gib'],
            'page_faults_per_step': r['page_faults_per_step'],
            'cores_busy': r['cores_busy']}
  if FLAGS.vs_torch:
    t = torch_bench(config, FLAGS.mode, FLAGS.steps, FLAGS.repeats,
                    FLAGS.warmup, FLAGS.torch_compile)
    if 'skipped' in t:
      print(f'torch: skipped: {t["skipped"]}')
    else:
      line = (f'torch eager: {t["eager"]:.2f} img/s, '
              f'{t["eager_faults"]:.0f} page faults/step, '
              f'{t["eager_busy"]:.2f} cores busy')
      if 'peak_gib' in t:
        line += f', peak {t["peak_gib"]:.2f} GiB'
      if 'flops' in t:
        line += (f'; torch counts {t["flops"] / 1e12:.3f} TFLOP/step '
                 f'(seg_jax/torch {r["flops"] / t["flops"]:.3f})')
      print(line)
      fields['torch_eager'] = t['eager']
      if 'compile' in t:
        print(f'torch.compile: {t["compile"]:.2f} img/s (first step '
              f'{t["compile_s"]:.1f} s)')
        fields['torch_compile'] = t['compile']
      fields['ratio_eager'] = r['images_per_sec'] / t['eager']
      if 'compile' in t:
        fields['ratio_compile'] = r['images_per_sec'] / t['compile']
      print(f'seg_jax / torch eager = {fields["ratio_eager"]:.2f}x' + (
          f', / torch.compile = {fields["ratio_compile"]:.2f}x'
          if 'compile' in t else ''))
  fields['compile_s'] = r['compile_s']
  fields['step_s'] = r['step_s']
  fields['flops'] = r['flops']
  fields.update(extra)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  fields['host_peak_gib'] = peak_rss
  print(' '.join(f'{k}={v:.6g}' for k, v in fields.items()), flush=True)


if __name__ == '__main__':
  sys.argv = ['--vs_torch' if a == '--vs-torch' else
              '--novs_torch' if a == '--no-vs-torch' else a for a in sys.argv]
  _define_flags()
  cli.run(main)
