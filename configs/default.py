"""Every configuration key of seg_jax, with its default.

Other configs start from `get_config()` here and override what differs.
Any key can be overridden on the command line: --config.train.num_steps=100.
"""

import ml_collections


def evaluator(mode='whole', window=(), stride=(), scales=(1.0,), flip=False,
              average='logits'):
  """One entry of `eval.evaluators` (see seg_jax/evaluators.py)."""
  return ml_collections.ConfigDict(dict(
      mode=mode, window=window, stride=stride, scales=scales, flip=flip,
      average=average))


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, shuffling, augmentation and dropout
  # Compiled steps are kept here and reused by the next start ('': off).
  c.compilation_cache_dir = '~/.cache/seg_jax/xla'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'unet'  # a key of seg_jax.models.MODELS
  c.model.num_classes = 21  # output classes; must match the dataset's
  c.model.kwargs = ml_collections.ConfigDict()  # model options, e.g. width=64
  # Weights to start from: a .safetensors / torch .pth file, or a seg_jax
  # run folder (or its checkpoints/<step>).
  c.model.init_from = ''
  c.model.init_format = 'resnet50'  # its torchvision name, e.g. resnet101, vgg16

  c.data = ml_collections.ConfigDict()
  c.data.name = 'shapes'  # a key of seg_jax.data.DATASETS
  c.data.root = ''  # dataset folder (unused by 'shapes' and 'tfds')
  c.data.train_split = 'train'  # split trained on, e.g. VOC's 'train_aug'
  c.data.val_split = 'val'  # split evaluated on ('': train without one)
  c.data.on_bad_sample = 'raise'  # 'raise', or 'skip' (and count) bad files
  c.data.crop_size = (512, 512)  # training crop (height, width)
  # Eval images/labels padded to (h, w); (): the crop, or for file datasets
  # the largest validation image rounded up to a multiple of 32.
  c.data.eval_pad_size = ()
  # Written by training into a run folder's config.json: the eval_pad_size
  # it fitted (not given), which evaluating another split fits again.
  c.data.eval_pad_size_fitted = ()
  c.data.ignore_label = 255  # label excluded from loss and metrics
  # data.name='folder': {mask value: class id}, e.g. {255: 1} for 0/255
  # binary masks; entries replace reading values as class ids.
  c.data.label_map = ml_collections.ConfigDict()
  # data.name='folder': a mask's file name is its image's plus this (before
  # the extension), e.g. '_mask' for images/x.jpg <-> masks/x_mask.png.
  c.data.mask_suffix = ''
  c.data.class_names = ()  # one name per class; (): the dataset's own
  c.data.palette = ()  # one (r, g, b) per class; (): the dataset's own
  c.data.scale_range = (0.5, 2.0)  # random rescale factor range for training
  c.data.flip = True  # random horizontal flip for training
  c.data.cat_max_ratio = 1.0  # <1: re-draw crops one class covers beyond this
  c.data.photometric = ml_collections.ConfigDict()  # colour distortion
  c.data.photometric.enabled = False  # brightness/contrast/saturation/hue
  c.data.photometric.brightness_delta = 32.0  # +-, 0..255 scale
  c.data.photometric.contrast_range = (0.5, 1.5)  # multiplicative factor
  c.data.photometric.saturation_range = (0.5, 1.5)  # factor vs. grey
  c.data.photometric.hue_delta = 36.0  # +- degrees of hue rotation
  # Image channels: 3 (RGB), 1 (grayscale), 4 (RGBA / 4-channel TIFF) or
  # more (multi-channel TIFF); other than 3 for data.name='folder' only.
  c.data.channels = 3
  c.data.mean = (123.675, 116.28, 103.53)  # per-channel mean, 0..255 scale
  c.data.std = (58.395, 57.12, 57.375)  # per-channel std, 0..255 scale
  c.data.worker_count = 0  # grain worker processes (0: in the main process)
  c.data.num_threads = 2  # grain reader threads per process
  c.data.prefetch = 8  # elements each grain reader keeps ready
  c.data.shapes = ml_collections.ConfigDict()  # the built-in synthetic set
  c.data.shapes.num_train = 10000  # training examples
  c.data.shapes.num_val = 500  # validation examples
  c.data.shapes.image_size = 64  # square image side in pixels
  c.data.shapes.max_shapes = 4  # at most this many instances per image
  c.data.shapes.seed = 0  # generation seed (independent of c.seed)
  c.data.tfds = ml_collections.ConfigDict()  # data.name='tfds' (ArrayRecord)
  c.data.tfds.name = ''  # TFDS name, e.g. 'oxford_iiit_pet'
  c.data.tfds.data_dir = ''  # TFDS data_dir ('': TFDS's default)
  c.data.tfds.image_key = 'image'  # feature holding the RGB image
  c.data.tfds.label_key = 'segmentation_mask'  # feature holding the mask
  c.data.tfds.label_offset = 0  # added to raw mask values (pets: -1)
  c.data.tfds.ignore_values = ()  # raw mask values that become 255
  c.data.tfds.class_names = ()  # names ((): class_0..); count = num_classes

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 16  # examples per step over all devices
  c.train.num_steps = 20000  # optimizer steps
  c.train.optimizer = 'sgd'  # 'sgd' (momentum) or 'adamw'
  c.train.learning_rate = 0.01  # peak learning rate
  c.train.momentum = 0.9  # SGD momentum
  c.train.schedule = 'poly'  # 'poly', 'cosine' or 'constant'
  c.train.poly_power = 0.9  # exponent of the poly schedule
  c.train.end_learning_rate = 1e-4  # final learning rate of poly/cosine
  c.train.warmup_steps = 0  # linear warmup from 0 over this many steps
  c.train.weight_decay = 5e-4  # L2 for SGD, decoupled decay for AdamW
  c.train.grad_clip_norm = 0.0  # clip gradients to this global norm (0: off)
  c.train.aux_loss_weight = 0.4  # weight of an auxiliary head's loss
  c.train.class_weights = ()  # per-class weights of cross_entropy and focal
  # Loss = sum of weight * loss over these (0: off); see seg_jax/losses.py.
  c.train.loss = ml_collections.ConfigDict()
  c.train.loss.cross_entropy = 1.0  # softmax cross-entropy
  c.train.loss.dice = 0.0  # soft multi-class Dice
  c.train.loss.focal = 0.0  # softmax focal loss
  c.train.loss.lovasz = 0.0  # Lovasz-softmax (an IoU surrogate)
  c.train.loss.binary_cross_entropy = 0.0  # foreground BCE (2 classes only)
  c.train.loss.binary_dice = 0.0  # foreground soft Dice (2 classes only)
  c.train.label_smoothing = 0.0  # cross_entropy target: (1-eps) one-hot + eps/C
  c.train.focal_gamma = 2.0  # focal exponent (0: cross-entropy)
  # >0: keep an exponential moving average of the weights (and BatchNorm
  # statistics) with this decay; it is what evaluation, the best checkpoint
  # and inference use. At step t the decay is min(ema_decay, t / (9 + t)).
  c.train.ema_decay = 0.0
  c.train.precision = 'float32'  # 'float32' or 'bfloat16' (f32 params, loss)
  c.train.log_every_steps = 50  # train metrics written every this many steps
  # A step with a NaN/Inf loss or gradient norm: False stops the run (naming
  # the step and the last good checkpoint); True skips its update, counted.
  c.train.skip_nonfinite = False

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 2000  # evaluate on the whole val split this often
  c.eval.global_batch_size = 16  # eval examples per step over all devices
  c.eval.in_training = ('whole',)  # evaluators run while training; 1st: result
  c.eval.num_images = 3  # image | truth | prediction pictures per evaluation
  c.eval.evaluators = ml_collections.ConfigDict()  # name -> how to evaluate
  # Each: mode 'whole' (padded image, one pass) or 'slide' (windows of
  # `window` every `stride`, overlaps averaged; (): crop size and 2/3 of
  # it); `scales` and `flip`: test-time augmentation merged at the original
  # resolution; `average`: merge 'logits' or softmax 'probs'.
  c.eval.evaluators.whole = evaluator()
  c.eval.evaluators.slide = evaluator(mode='slide')
  c.eval.evaluators.tta = evaluator(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                                    flip=True)

  c.crf = ml_collections.ConfigDict()  # dense CRF (predict/evaluate --crf)
  c.crf.iterations = 5  # mean-field iterations
  c.crf.gaussian_sxy = 3.0  # smoothness kernel: spatial std in pixels
  c.crf.gaussian_weight = 3.0  # smoothness kernel weight
  c.crf.bilateral_sxy = 80.0  # appearance kernel: spatial std in pixels
  c.crf.bilateral_srgb = 13.0  # appearance kernel: colour std (0..255)
  c.crf.bilateral_weight = 10.0  # appearance kernel weight

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 2000  # save train state + data iterator this often
  c.checkpoint.max_to_keep = 3  # most recent checkpoints kept (+ the best)
  # A damaged latest checkpoint: 'raise' (name the file), or 'previous'
  # (warn and resume from the newest good one).
  c.checkpoint.on_corrupt = 'raise'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)  # devices per axis; -1 takes all remaining devices
  c.mesh.axes = ('data',)  # 'data', optionally 'fsdp'; batch split over both
  c.mesh.fsdp_min_size = 1024  # on 'fsdp': smaller arrays stay replicated
  return c
