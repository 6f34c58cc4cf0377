"""Export a trained model as StableHLO or ONNX, and load it without seg_jax.

    python -m seg_jax.export --config=configs/x.py --workdir=DIR --out=FILE
    python -m seg_jax.export --format=onnx --workdir=DIR --out=FILE.onnx

serialises, with `jax.export`, the whole path from uint8 images
(b, H, W, C) to int32 label maps (b, H, W): normalisation, the model with
the checkpoint's weights baked in, the configured inference (scales, flip,
sliding window) and the argmax. The batch size b is symbolic; H and W are
fixed (default: `data.eval_pad_size`, else the crop), C is data.channels
(3: RGB). FILE.json records the input size and channels, class names and
palette.

`--format=onnx` writes the same function as an ONNX model (opset 17, the
`[onnx]` extra; see `seg_jax.to_onnx`, which converts seg_jax's jaxpr and
gives `load_onnx(FILE)` on ONNX Runtime).

`load(FILE)` returns a function numpy images -> numpy labels; it needs only
jax, numpy and flatbuffers (jax.export's serialiser). Importing this module
imports neither flax nor the training code, and defines no flags.

--config may be left out: the run folder's config.json (written by
training) is read; overrides (--config.a.b=value) still apply.
"""

# First: the host allocator's settings (before JAX is imported:
# seg_jax.host_memory), and Ctrl-C is clean from here on.
from seg_jax import host_memory, interrupt

if __name__ == '__main__':
  host_memory.configure()
if __name__ in ('__main__', '__mp_main__'):
  interrupt.install('nothing was written')

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os

import jax


def load(path):
  """The exported model at `path` as a function.

  Returns:
    (predict, meta): `predict(images)` maps uint8 (b, H, W, C) to int32
    label maps (b, H, W) for any b; `meta` is FILE.json as a dict. Smaller
    images (b, h, w, C) are mirror-filled to (H, W), as `evaluate` fills
    its canvas, and their labels cropped back to (h, w).
  """
  from seg_jax import errors, mirror  # pylint: disable=g-import-not-at-top
  with open(path + '.json') as f:
    meta = json.load(f)
  if meta.get('format', 'stablehlo') != 'stablehlo':
    raise errors.ConfigError(
        f'{path} is an {meta["format"]} model (its .json says so): load it '
        'with seg_jax.to_onnx.load_onnx.')
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  height, width = meta['input_size']
  channels = meta.get('channels', 3)

  warned = set()

  def predict(images):
    return mirror.predict_on_canvas(exported.call, images, height, width,
                                    channels, path, meta, warned)

  return predict, meta


def make_export_fn(model, config, spec, variables, height, width):
  """The exported function: uint8 (b, H, W, C) -> int32 (b, H, W), the
  predict step's own function with `variables` baked in and every image
  valid over the whole (H, W) canvas.

  Its 3x3 convolutions are traced as convolutions
  (`layers.direct_convolutions`), not as this CPU's Winograd products: the
  program runs on another runtime (ONNX Runtime, the platforms given),
  whose convolution kernels are its own."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seg_jax import inference  # pylint: disable=g-import-not-at-top
  from seg_jax.models import layers  # pylint: disable=g-import-not-at-top
  predict_step = inference.make_predict_fn(model, config, spec)

  def predict(images):  # (b, H, W, C) uint8 -> (b, H, W) int32
    sizes = jnp.broadcast_to(jnp.array([height, width], jnp.int32),
                             (images.shape[0], 2))
    with layers.direct_convolutions():
      return predict_step(variables, images, sizes)

  return predict


FORMATS = ('stablehlo', 'onnx')
# What jax.export lowers for.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_model(config, workdir, out, *, checkpoint='latest', size=None,
                 evaluator='', platforms=None, format='stablehlo'):  # pylint: disable=redefined-builtin
  """Writes preprocessing + model + inference + argmax to `out`.

  Args:
    config: the config the checkpoint was trained with.
    workdir: the training run folder.
    out: output file (FILE and FILE.json are written).
    checkpoint: 'latest' or a step.
    size: (H, W) input size (default: `data.eval_pad_size` or the crop).
    evaluator: inference settings, a key of `eval.evaluators` (default: the
      first of `eval.in_training`).
    platforms: platforms to lower for, e.g. ('cpu', 'cuda') (default: this
      machine's); StableHLO only.
    format: 'stablehlo' (jax.export) or 'onnx' (`seg_jax.to_onnx`).

  Returns:
    The meta dict written to FILE.json.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seg_jax import data, errors, inference, sharding  # pylint: disable=g-import-not-at-top
  from seg_jax.checkpoint import restore_for_inference  # pylint: disable=g-import-not-at-top
  from seg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  height, width = transforms.pair(
      size or config.data.eval_pad_size or config.data.crop_size, '--size')
  if format not in FORMATS:
    raise errors.ConfigError(f'--format={format}: use one of {FORMATS}.')
  if format == 'onnx' and platforms:
    raise errors.ConfigError('--platforms is for --format=stablehlo; an ONNX '
                             'model runs wherever ONNX Runtime does.')
  unknown = [p for p in platforms or () if p not in PLATFORMS]
  if unknown:
    raise errors.ConfigError(
        f'--platforms={",".join(platforms)}: {unknown[0]!r} is none of '
        f'{", ".join(PLATFORMS)}.')
  if os.path.isdir(out):
    raise errors.ConfigError(f'--out={out} is a folder; give a file name '
                             '(FILE and FILE.json are written).')
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.make_folder(os.path.dirname(os.path.abspath(out)), '--out', out)
  name = evaluator or inference.default_name(config)
  spec = inference.spec_from_config(config, name)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  model, variables, step = restore_for_inference(config, workdir, mesh,
                                                 checkpoint)
  variables = jax.device_get(variables)  # baked into the program
  # The predict step's own function, traced into the exported program.
  predict = make_export_fn(model, config, spec, variables, height, width)
  if format == 'onnx':
    from seg_jax import to_onnx  # pylint: disable=g-import-not-at-top
    model_proto = to_onnx.convert(
        predict, (height, width, config.data.channels),
        f'model {config.model.name}, evaluator {name}')
    _writing(out, lambda: to_onnx.save(model_proto, out))
    written = {'format': 'onnx', 'opset': to_onnx.OPSET,
               'output_dtype': 'int32'}
  else:
    batch, = jax.export.symbolic_shape('b')
    exported = jax.export.export(jax.jit(predict), platforms=platforms)(
        jax.ShapeDtypeStruct((batch, height, width, config.data.channels),
                             jnp.uint8))
    _writing(out, lambda: _write_bytes(out, exported.serialize()))
    written = {'format': 'stablehlo', 'platforms': list(exported.platforms)}
  class_names, palette = data.class_info(config)
  meta = {'input_size': [height, width], 'channels': config.data.channels,
          'step': int(step),
          'model': config.model.name, 'inference': name,
          'evaluator': {'mode': spec.mode, 'scales': list(spec.scales),
                        'flip': bool(spec.flip)},
          'class_names': list(class_names), 'palette': palette.tolist(),
          **written}
  _writing(out + '.json', lambda: _write_bytes(
      out + '.json', json.dumps(meta, indent=1).encode()))
  return meta


def _write_bytes(path, data):
  with open(path, 'wb') as f:
    f.write(data)


def _writing(path, write):
  """`write()`; a failed write (disk full, no permission) is a one-line
  `ConfigError` naming the file, not a traceback."""
  from seg_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    write()
  except OSError as e:
    raise errors.ConfigError(f'--out: cannot write {path} '
                             f'({e.strerror or e}).') from None


def _define_flags():
  """The CLI's flags; defined only when run as a program, so that `load`
  can be imported into any program."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.define_run_flags('The configuration the checkpoint was trained with.',
                       'The training run folder (holds checkpoints/ and '
                       'config.json).')
  cli.define_inference_flags(crf=False)
  flags.DEFINE_string('out', None, 'Output file; FILE.json is written too.')
  flags.DEFINE_list('size', [], 'Input height,width (default: '
                    'data.eval_pad_size, else data.crop_size).')
  flags.DEFINE_list('platforms', [], "Lower for these platforms, e.g. "
                    "cpu,cuda,tpu (default: this machine's; StableHLO "
                    'only).')
  flags.DEFINE_enum('format', None, list(FORMATS),
                    'stablehlo: jax.export, loaded with export.load; onnx: '
                    'an ONNX model (opset 17) for ONNX Runtime, loaded with '
                    'to_onnx.load_onnx (needs the [onnx] extra). Default: '
                    'onnx for an --out ending in .onnx, else stablehlo.')
  flags.mark_flags_as_required(['out'])
  return flags.FLAGS


def format_of(given, out):
  """--format as given, or from --out's extension (.onnx: onnx); an .onnx
  name for another format is refused."""
  from seg_jax import errors  # pylint: disable=g-import-not-at-top
  onnx_name = out.lower().endswith('.onnx')
  if given is None:
    return 'onnx' if onnx_name else 'stablehlo'
  if onnx_name and given != 'onnx':
    raise errors.ConfigError(f'--out={out} names an ONNX file but '
                             f'--format={given}: give --format=onnx, or '
                             'another file name.')
  return given


def _size_flag(values):
  """--size=H,W as (H, W), or None when not given."""
  from seg_jax import errors  # pylint: disable=g-import-not-at-top
  if not values:
    return None
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise errors.ConfigError(f'--size={",".join(values)}: give height,width '
                             'in pixels.') from None


def main(argv):
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.start(argv)
  f = FLAGS
  fmt = format_of(f.format, f.out)
  meta = export_model(f.config, f.workdir, f.out, checkpoint=f.checkpoint,
                      size=_size_flag(f.size),
                      evaluator=cli.inference_names(f.config, one=True)[0],
                      platforms=tuple(f.platforms) or None,
                      format=fmt)
  target = (f'opset={meta["opset"]}' if fmt == 'onnx' else
            f'platforms={",".join(meta["platforms"])}')
  print(f'Exported: step={meta["step"]} input={meta["input_size"]} '
        f'format={fmt} {target} -> {f.out} '
        f'({os.path.getsize(f.out) / 2**20:.1f} MiB)', flush=True)


if __name__ == '__main__':
  from seg_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  _cli.run(main)
