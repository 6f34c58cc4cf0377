"""Per-image CPU time: ONNX Runtime on the ONNX export against seg_jax's
jitted predict step, the same model and image, in one process.

    python benchmarks/onnx_speed.py [--size=512,512] [--repeats=5] \\
        [--configs=configs/fcn_resnet50_voc.py,...]

For each config: writes a checkpoint of its model (initial weights: time
does not depend on them), exports it with
`seg_jax.export.export_model(format='onnx')` at --size (whole-image
inference), loads it with `seg_jax.to_onnx.load_onnx` (ONNX Runtime's CPU
provider, its default threads) and times one image through each (median
of --repeats after a warm-up), checking that the labels agree. Not part of
the installed package: a measuring tool.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
from common import get_config, median_seconds  # benchmarks/common.py

CONFIGS = ('configs/unet_camvid.py', 'configs/fcn_resnet50_voc.py',
           'configs/deeplabv3_resnet50_voc.py',
           'configs/deeplabv3_mobilenet_v3_large_voc.py',
           'configs/lraspp_mobilenet_v3_large_voc.py')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='512,512')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--configs', default=','.join(CONFIGS))
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])
  import jax  # pylint: disable=g-import-not-at-top
  from seg_jax import (checkpoint, export, inference, sharding, to_onnx,  # pylint: disable=g-import-not-at-top
                       train)
  h, w = (int(v) for v in args.size.split(','))
  image = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), np.uint8)
  sizes = np.array([[h, w]], np.int32)
  for path in args.configs.split(','):
    config = get_config(path)
    config.data.name, config.data.val_split = 'shapes', ''
    config.model.num_classes = 5
    config.model.init_from = ''
    config.data.crop_size = config.data.eval_pad_size = (h, w)
    config.compilation_cache_dir = ''
    config.train.global_batch_size = len(jax.devices())
    with tempfile.TemporaryDirectory() as tmp:
      trainer = train.Trainer(config, tmp)
      trainer.checkpointer.save_final(1, trainer.state,
                                      iter(trainer.train_ds))
      trainer.checkpointer.close()
      out = os.path.join(tmp, 'model.onnx')
      export.export_model(config, tmp, out, size=(h, w), format='onnx')
      ort, _ = to_onnx.load_onnx(out)
      mesh = sharding.create_mesh(devices=jax.devices()[:1])
      model, variables, _ = checkpoint.restore_for_inference(config, tmp,
                                                             mesh)
      step = inference.make_predict_step(
          model, config, inference.spec_from_config(config, 'whole'))
      ours = lambda: np.asarray(step(variables, image, sizes))
      t_ort = median_seconds(lambda: ort(image), args.repeats)
      t_jax = median_seconds(ours, args.repeats)
      agree = float(np.mean(ort(image) == ours()))
    print(f'{config.model.name} {h}x{w}: ONNX Runtime {1e3 * t_ort:.0f} ms, '
          f'seg_jax {1e3 * t_jax:.0f} ms per image (labels agree on '
          f'{100 * agree:.3f}% of pixels)', flush=True)


if __name__ == '__main__':
  main()
