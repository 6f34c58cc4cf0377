"""U-Net trained from scratch on CamVid (11 classes) on a CPU.

A CPU recipe, no pretrained weights: 750 steps in the time the 480-step
recipe of the slower step took (docs/results.md, CamVid on a CPU).
Training crops come from frames rescaled by 0.4-0.8 (the full frame is
360x480); evaluation runs the model on the frame rescaled by 0.6, the
middle of that range, and on its mirror image, averages the logits and
resizes them back, so val mIoU is measured on the full-resolution labels.
The full-resolution GPU variant is `configs/unet_camvid_gpu.py`.

  python -m seg_jax.main --config=configs/unet_camvid.py --workdir=runs/unet_camvid
"""

from configs import default

# Square roots of SegNet's median-frequency class weights: rare classes
# (pole, sign, pedestrian, bicyclist) get 4-8x the weight of road and sky.
CAMVID_SQRT_WEIGHTS = (0.509, 0.427, 2.136, 0.376, 0.951, 0.619, 3.106, 1.357,
                       0.826, 2.500, 2.713)


def get_config():
  c = default.get_config()
  c.model.name = 'unet'
  c.model.num_classes = 11
  c.model.kwargs = dict(width=16, depth=4, batch_norm=True)
  c.data.name = 'camvid'
  c.data.root = 'data/camvid'  # SegNet's CamVid/ folder (docs/datasets.md)
  c.data.crop_size = (176, 240)
  c.data.scale_range = (0.4, 0.8)
  c.data.eval_pad_size = (368, 480)
  c.eval.evaluators.whole.scales = (0.6,)  # logits resized back to full
  c.eval.evaluators.whole.flip = True  # and the mirror image's averaged in
  c.data.worker_count = 0
  c.train.global_batch_size = 8
  c.train.num_steps = 750
  c.train.optimizer = 'adamw'
  c.train.learning_rate = 3e-3
  c.train.schedule = 'cosine'
  c.train.warmup_steps = 40
  c.train.end_learning_rate = 0.0
  c.train.weight_decay = 1e-4
  c.train.class_weights = CAMVID_SQRT_WEIGHTS
  c.train.log_every_steps = 50
  c.eval.every_steps = 375
  c.eval.global_batch_size = 8
  c.checkpoint.every_steps = 375
  return c
