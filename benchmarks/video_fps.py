"""End-to-end video frame rate of `seg_jax.predict` (decode, infer,
overlay, encode), on this machine.

    python benchmarks/video_fps.py [--config=configs/lraspp_mobilenet_v3_large_voc.py]
        [--frames=150] [--size=360,480] [--batch=8] [--workdir=/tmp/video_fps]

Writes a checkpoint of the config's model (initial weights: the frame rate
does not depend on them; a new one at each run, under --workdir/run) and a
synthetic H.264 video of moving shapes at --size, then runs predict's
video path on it in this process, as `python -m seg_jax.predict
--workdir=DIR --out=OUT VIDEO` does: the first batch (compilation
included) and the frames/s of the rest are printed, and the output
video's frame count, rate and size are checked against the input's. Not part of the installed package: a measuring tool.
"""

import argparse
import os
import shutil
import sys
import time

import numpy as np


def write_video(path, frames, height, width, rate=30):
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:height, :width]
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264', rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for t in range(frames):
      frame = np.full((height, width, 3), 90, np.uint8)
      for k in range(4):
        cy = height / 2 + height / 3 * np.sin(0.05 * t + k)
        cx = width / 2 + width / 3 * np.cos(0.04 * t + 2 * k)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (20 + 10 * k) ** 2
        frame[disc] = rng.integers(0, 256, 3)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame,
                                                             format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config',
                      default='configs/lraspp_mobilenet_v3_large_voc.py')
  parser.add_argument('--frames', type=int, default=150)
  parser.add_argument('--size', default='360,480')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--workdir', default='/tmp/video_fps')
  args = parser.parse_args()
  # benchmarks/common.py (first: host memory); imported here so tests can
  # load write_video alone.
  from common import get_config  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])
  import jax  # pylint: disable=g-import-not-at-top
  from seg_jax import (checkpoint, crf, inference, predict, sharding,  # pylint: disable=g-import-not-at-top
                       train)
  del crf
  h, w = (int(v) for v in args.size.split(','))
  config = get_config(args.config)
  config.data.name, config.data.val_split = 'shapes', ''
  config.model.num_classes = 5
  config.model.init_from = ''
  config.data.crop_size = (h, w)
  config.compilation_cache_dir = ''
  os.makedirs(args.workdir, exist_ok=True)
  ckpt = os.path.join(args.workdir, 'run')
  shutil.rmtree(ckpt, ignore_errors=True)  # another config's run: a new one
  trainer = train.Trainer(config, ckpt)
  trainer.checkpointer.save_final(1, trainer.state, iter(trainer.train_ds))
  trainer.checkpointer.close()
  video = os.path.join(args.workdir, 'in.mp4')
  write_video(video, args.frames, h, w)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  model, variables, _ = checkpoint.restore_for_inference(config, ckpt, mesh)
  predictor = predict.Predictor(config, model, variables,
                                inference.spec_from_config(config, 'whole'),
                                args.batch)
  outputs = predict.Outputs(os.path.join(args.workdir, 'out'),
                            np.zeros((5, 3), np.uint8), [], 0.5)
  marks = []
  t0 = time.perf_counter()
  frames = predict.predict_video(
      video, 'out', predictor, outputs,
      lambda n, total: marks.append((time.perf_counter(), n)))
  total = time.perf_counter() - t0
  first = marks[0][0] - t0
  rest = sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])
  import av  # pylint: disable=g-import-not-at-top
  with av.open(video) as a, av.open(os.path.join(args.workdir, 'out',
                                                 'out_overlay.mp4')) as b:
    sa, sb = a.streams.video[0], b.streams.video[0]
    same = (sum(1 for _ in b.decode(sb)) == frames == args.frames and
            sa.average_rate == sb.average_rate and
            (sb.codec_context.width, sb.codec_context.height) == (w, h))
  print(f'{config.model.name}, {h}x{w}, batch {args.batch}: {frames} frames '
        f'in {total:.1f} s; first batch {first:.1f} s (compilation '
        f'included); then {rest:.1f} frames/s end to end (decode, infer, '
        f'overlay, encode); output video matches the input: {same}',
        flush=True)


if __name__ == '__main__':
  main()
