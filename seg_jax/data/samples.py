"""Sample inputs for `seg_jax.predict`, from the built-in shapes dataset.

    python -m seg_jax.data.samples --out=samples

writes `samples/images/` (shapes images of three sizes, JPEG and PNG) and
`samples/shapes.mp4` (a short video panning along a strip of shapes), so
that a model trained on `configs/unet_shapes.py` can be tried on a folder
and a video without any download.
"""

import os

import numpy as np
from absl import flags
from PIL import Image

from seg_jax import cli
from seg_jax.data import shapes

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'samples', 'Folder to write into.')
flags.DEFINE_integer('num_images', 6, 'Images to write.', lower_bound=1)
flags.DEFINE_integer('frames', 48, 'Video frames (at 12 frames/s).',
                     lower_bound=1)


def _tiles(seed, first, rows, cols, size=48):
  """A (rows x cols) grid of shapes val images of `size` pixels: larger
  pictures whose objects keep the scale `configs/unet_shapes.py` trains at."""
  return np.concatenate([np.concatenate([
      shapes.make_example(seed, 'val', first + r * cols + c,
                          size=size)['image'] for c in range(cols)], axis=1)
                         for r in range(rows)], axis=0)


def write_images(folder, num_images, seed=0):
  """Images of three sizes (48x48, 48x96, 96x96), alternately PNG and JPEG."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(num_images):
    rows, cols = ((1, 1), (1, 2), (2, 2))[i % 3]
    image = _tiles(seed, 1000 + 4 * i, rows, cols)
    path = os.path.join(folder, f'shapes_{i}_{48 * rows}x{48 * cols}.' +
                        ('jpg' if i % 2 else 'png'))
    Image.fromarray(image).save(path, quality=95)
    paths.append(path)
  return paths


def write_video(path, frames, width=96, rate=12, seed=0):
  """A 48-pixel-high video panning left to right along a strip of shapes."""
  import av  # pylint: disable=g-import-not-at-top
  strip = _tiles(seed, 2000, 1, 6)
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=rate)
    stream.width, stream.height = width, strip.shape[0]
    stream.pix_fmt = 'yuv420p'
    for k in range(frames):
      left = int(round(k * (strip.shape[1] - width) / max(frames - 1, 1)))
      frame = np.ascontiguousarray(strip[:, left:left + width])
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame,
                                                             format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def main(argv):
  del argv
  cli.make_folder(FLAGS.out)
  images = write_images(os.path.join(FLAGS.out, 'images'), FLAGS.num_images)
  video = write_video(os.path.join(FLAGS.out, 'shapes.mp4'), FLAGS.frames)
  print(f'Wrote {len(images)} images to {FLAGS.out}/images and {video}')


if __name__ == '__main__':
  cli.run(main)
