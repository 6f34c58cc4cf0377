"""Evaluate a checkpoint: `python -m seg_jax.evaluate --config=... --workdir=DIR`.

Restores the model variables of a checkpoint in `DIR/checkpoints`, runs one
or more of the config's evaluators (`eval.evaluators`: whole image, sliding
window, multi-scale + flip) over a split, and for each prints a per-class
table and one summary line, and writes `DIR/eval/<split>_<evaluator>_step<N>`
`.json` (every score, per class with its name, and the confusion matrix) and
`..._confusion.png` (the row-normalised confusion matrix as a heat-map).
Imports the model, state, steps and data, never the training loop.

--config may be left out: the run folder's config.json (written by
training) is read, overrides (--config.a.b=value) still apply.
"""

# First: the host allocator's settings (before JAX is imported:
# seg_jax.host_memory), and Ctrl-C is clean from here on.
from seg_jax import host_memory, interrupt

if __name__ == '__main__':
  host_memory.configure()
if __name__ in ('__main__', '__mp_main__'):
  interrupt.install('reports written so far are kept')

# pylint: disable=g-import-not-at-top,wrong-import-position
import copy
import json
import os

import jax
import numpy as np
from absl import flags, logging

from seg_jax import cli, errors
from seg_jax import workdir as run_folder

FLAGS = flags.FLAGS


def plot_confusion(confusion, class_names, path, title=''):
  """Saves the row-normalised confusion matrix as a heat-map PNG.

  Rows are true classes, columns predictions; each row is divided by the
  class's labelled pixels (a row without any stays 0), so the diagonal is
  each class's accuracy.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  m = np.asarray(confusion, np.float64)
  rows = m.sum(1, keepdims=True)
  norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
  n = len(class_names)
  side = max(4.0, 0.45 * n + 2.5)
  fig, ax = plt.subplots(figsize=(side + 1.2, side))
  image = ax.imshow(norm, cmap='Blues', vmin=0.0, vmax=1.0)
  ax.set_xticks(range(n), class_names, rotation=60, ha='right', fontsize=8)
  ax.set_yticks(range(n), class_names, fontsize=8)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if n <= 30:
    for i in range(n):
      for j in range(n):
        if norm[i, j] >= 0.005:
          ax.text(j, i, f'{100 * norm[i, j]:.0f}', ha='center', va='center',
                  fontsize=6, color='white' if norm[i, j] > 0.5 else 'black')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label='share of the true class (row)')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_line(result, step, split):
  """The last line printed per evaluator: its mean scores."""
  s = result.scores
  return (f'Evaluated: step={step} split={split} evaluator={result.name} '
          f'aAcc={s["pixel_accuracy"]:.4f} mAcc={s["mean_accuracy"]:.4f} '
          f'mIoU={s["miou"]:.4f} fwIoU={s["fwiou"]:.4f} '
          f'mDice={s["mdice"]:.4f} mFscore={s["mfscore"]:.4f}')


def evaluate(config, workdir, *, checkpoint='latest', split='val',
             names=(), out='', use_crf=False):
  """Evaluates a checkpoint of `workdir`; writes and returns the reports.

  With `use_crf`, every prediction is refined with the dense CRF
  (`config.crf`) and the evaluator is reported as '<name>+crf'.

  Returns:
    list of (EvalResult, report dict), one per evaluator.
  """
  from seg_jax import (crf, data, evaluators, inference,  # pylint: disable=g-import-not-at-top
                       sharding)
  from seg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from seg_jax.checkpoint import restore_for_inference  # pylint: disable=g-import-not-at-top
  if split == 'val' and not config.data.val_split:
    raise errors.ConfigError(
        "data.val_split is '' (the run trained without a validation "
        "split), so --split=val (evaluate's default, which reads "
        'data.val_split) names no split: name the dataset\'s split with '
        '--config.data.val_split=NAME (e.g. val), or give --split=train.')
  mesh = sharding.inference_mesh(config)
  model, variables, step = restore_for_inference(config, workdir, mesh,
                                                 checkpoint)
  source, sizes = data.open_split(config, split, training=False)
  config = copy.deepcopy(config)
  config.data.eval_pad_size = data.fit_eval_pad_size(config, source, sizes)
  class_names = list(source.class_names)
  average = config.train.ema_decay > 0
  # A run that kept a weight average, read without it: its reports are
  # named apart, so that they do not replace the average's.
  raw = not average and _kept_average(workdir)
  out = out or os.path.join(workdir, 'eval')
  writes = jax.process_index() == 0
  if writes:
    cli.make_folder(out)
  reports = []
  refiner = crf.Refiner(crf.CRFParams.from_config(config)) if use_crf \
      else None
  for name in names or (inference.default_name(config),):
    skips = pipeline.SkipCounter()
    evaluator = evaluators.Evaluator(name, config, model, mesh, source,
                                     refiner=refiner, skip_counter=skips)
    result = evaluator.run(variables, progress=_progress_bar(name, writes))
    name = result.name
    report = result.report(class_names, split=split, step=step)
    # The images scored ('skip' mode leaves bad files out; counted on this
    # process, which reads all of them in a one-process evaluation).
    report['images'], report['skipped'] = len(source) - skips.count, skips.count
    report['weights'] = ('average' if average else 'raw' if raw else
                         'trained')
    report['data'] = data_identity(config)
    # The dataset's own split name ('train' reads data.train_split, e.g.
    # VOC's train_aug).
    report['dataset_split'] = data.split_name(config, split)
    if writes:
      stem = os.path.join(out, f'{split}_{name}{"_raw" if raw else ""}'
                          f'_step{step}')
      _warn_if_settings_change(f'{stem}.json', report['settings'],
                               report['data'])
      with open(f'{stem}.json', 'w') as f:
        json.dump(report, f, indent=1)
      plot_confusion(result.confusion, class_names, f'{stem}_confusion.png',
                     f'{config.model.name} on {split}, {name}, step {step}: '
                     f'mIoU {100 * result.scores["miou"]:.2f}')
      print(result.table(class_names))
      if skips.count:
        print(f'{skips.count} of {len(source)} images skipped '
              "(data.on_bad_sample='skip'): the scores are of the other "
              f"{report['images']}.")
      if not result.confusion.sum():
        print(f'Every pixel of {split} is ignored (labelled '
              f'data.ignore_label={config.data.ignore_label}, e.g. a test '
              'split whose labels are not public, as Cityscapes\'): the '
              'scores are nan.')
      if raw:
        print('The raw weights: the run kept a weight average, read here '
              'without it (train.ema_decay=0).')
      print(f'Wrote {stem}.json and {stem}_confusion.png')
      print(summary_line(result, step, split), flush=True)
    reports.append((result, report))
  return reports


def data_identity(config):
  """What a report's images were: the dataset and where it was read from
  (a folder as an absolute path), so that a report of other data is not
  replaced unnoticed."""
  d = config.data
  found = {'name': d.name}
  if d.root:
    found['root'] = os.path.abspath(os.path.expanduser(d.root))
  if d.name == 'tfds':
    found['tfds'] = d.tfds.name
    if d.tfds.data_dir:
      found['data_dir'] = d.tfds.data_dir
  return found


def _warn_if_settings_change(path, settings, data=None):
  """Warns when `path`, about to be replaced, holds a report of the same
  evaluator name with other settings (e.g. another slide window) or of
  other data (another data.root)."""
  try:
    with open(path) as f:
      before = json.load(f)
  except (OSError, ValueError):
    return
  if not isinstance(before, dict):
    return
  changed = [f'{key} {before[key]}; now {now}'
             for key, now in (('settings', settings), ('data', data))
             if now is not None and before.get(key) is not None and
             before[key] != json.loads(json.dumps(now))]
  if changed:
    logging.warning('Replacing %s, written with other %s: give --out to '
                    'keep both.', path, ' and '.join(changed))


def _kept_average(workdir):
  """Whether the run in `workdir` kept a weight average (its config.json
  says train.ema_decay > 0)."""
  if not os.path.isfile(run_folder.config_path(workdir)):
    return False
  stored = run_folder.read_config(workdir)
  return (stored.get('train', {}).get('ema_decay') or 0) > 0


def _progress_bar(name, enabled):
  """A tqdm progress callback over evaluation batches (on stderr). The bar
  starts after the first batch, so its rate leaves the first batch's
  compilation out (a one-batch evaluation shows no rate)."""
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = None

  def update(done, total):
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, initial=done, desc=f'eval {name}',
                 unit='batch', mininterval=5.0)
    bar.update(done - bar.n)
    if done == total:
      bar.close()

  return update


def _define_flags():
  """The CLI's flags; defined only when run as a program, so that the
  module can be imported (by tests, by other programs) without them."""
  cli.define_run_flags('The configuration the checkpoint was trained with.',
                       'The training run folder (holds checkpoints/ and '
                       'config.json).')
  cli.define_inference_flags()
  flags.DEFINE_string('split', 'val', "Split to evaluate: 'val' "
                      "(data.val_split), 'train' (data.train_split) or a "
                      "dataset split name such as 'test'.")
  flags.DEFINE_string('out', '', 'Output folder (default: WORKDIR/eval).')


def main(argv):
  cli.start(argv)
  from seg_jax import validate
  validate.check_config(FLAGS.config, training=False)
  logging.info('JAX %d devices (%s)', jax.device_count(),
               jax.default_backend())
  evaluate(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint,
           split=FLAGS.split,
           names=tuple(cli.inference_names(FLAGS.config)), out=FLAGS.out,
           use_crf=FLAGS.crf)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
