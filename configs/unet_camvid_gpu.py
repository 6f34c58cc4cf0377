"""U-Net (width 64, the paper's size) on CamVid at full resolution: a GPU run.

Crops of 360x480 from frames rescaled by 0.75-1.5, flip and photometric
distortion, evaluation on the full 360x480 frames (padded to 384x480).

  python -m seg_jax.main --config=configs/unet_camvid_gpu.py --workdir=runs/unet_camvid_gpu
"""

from configs import unet_camvid


def get_config():
  c = unet_camvid.get_config()
  c.model.kwargs = dict(width=64, depth=4, batch_norm=True)
  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.75, 1.5)
  c.data.eval_pad_size = (384, 480)
  c.data.photometric.enabled = True
  c.data.worker_count = 8
  c.train.global_batch_size = 16
  c.train.num_steps = 20000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 500
  c.train.log_every_steps = 100
  c.eval.every_steps = 2000
  c.eval.global_batch_size = 16
  c.checkpoint.every_steps = 2000
  return c
