"""Checkpoints: the one file that talks to orbax.

A checkpoint is one orbax step folder holding the train state and the
data-iterator state of every process together, so a resume continues both
the model and the data exactly where they were. Both restore onto another
topology: the state is resharded onto the new mesh (any device count, any
`mesh.shape`), and the data stream, a function of the global batch number
alone, is re-split over the new number of processes. Saves are
asynchronous and atomic: a save cut short leaves a
`*.orbax-checkpoint-tmp-*` folder that is never restored from.
"""

import json
import os
import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from seg_jax import validate


class _IteratorSnapshot:
  """The iterator state taken at save time.

  orbax may write the data-iterator item after `save()` returns, while the
  loop has already advanced the live iterator; saving a snapshot keeps the
  checkpoint's data position equal to its train step.
  """

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self):
    return self._state


class Checkpointer:
  """Saves and restores (train state, data iterator) in `directory`.

  Keeps the newest `max_to_keep` checkpoints **and** the best one by
  validation mIoU (saved with `metrics={'miou': ...}`), whichever they are:
  the best never pushes out the newest, which a resume needs, and survives
  a resume (its mIoU is stored beside it).

  Args:
    directory: checkpoint folder (created if needed).
    every_steps: save when step % every_steps == 0.
    max_to_keep: number of most recent checkpoints kept.
    on_corrupt: 'raise' (a damaged latest checkpoint is an error) or
      'previous' (fall back to the newest good one, with a warning).
  """

  def __init__(self, directory, every_steps, max_to_keep, on_corrupt='raise'):
    self.on_corrupt = check_on_corrupt(on_corrupt)
    self._unlisted = None  # the last step saved, its file list not written
    directory = os.path.abspath(directory)  # orbax rejects relative paths
    options = ocp.CheckpointManagerOptions(
        best_fn=_miou, best_mode='max',
        preservation_policy=pp.AnyPreservationPolicy([
            pp.LatestN(max_to_keep),
            pp.BestN(get_metric_fn=_miou, n=1,
                     keep_checkpoints_without_metrics=False)]),
        enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_handlers=_item_handlers())
    self.directory = directory
    self.every_steps = every_steps

  def best(self):
    """(step, mIoU) of the best checkpoint kept, or None if none has one."""
    return _best(self._manager)

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def restore_or_keep(self, state, data_iter):
    """Restores the latest checkpoint into (state, data_iter) if one exists.

    A damaged checkpoint (a file missing or of another size than written,
    or one orbax cannot read) raises `CheckpointError` naming the file;
    with `on_corrupt='previous'` the next older checkpoint is tried instead,
    with a warning naming what was skipped.

    Args:
      state: a freshly initialised `TrainState`; its shapes, dtypes and
        shardings are the template.
      data_iter: a fresh grain iterator; its position is set in place.

    Returns:
      (state, data_iter): restored, or the inputs when there is nothing.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        verify(self.directory, step)
        return self.restore(step, state, data_iter)
      except validate.ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        problem = e if isinstance(e, CheckpointError) else CheckpointError(
            f'Checkpoint {self.directory}/{step} cannot be restored '
            f'({type(e).__name__}: {str(e).splitlines()[0][:300]}).')
        if self.on_corrupt != 'previous':
          raise CheckpointError(
              f'{problem} Move {self.directory}/{step} away to resume from '
              'the previous checkpoint, or set '
              "checkpoint.on_corrupt='previous'.") from None
        self._set_aside(step)
        logging.warning("%s Moved to %s/damaged_%d; trying the previous "
                        "checkpoint (checkpoint.on_corrupt='previous').",
                        problem, self.directory, step)
    return state, data_iter

  def _set_aside(self, step):
    """Renames a damaged step folder to damaged_<step> (kept for a look,
    out of orbax's list, so training can save that step again)."""
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)),
                 os.path.join(self.directory, f'damaged_{step}'))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'seg_jax_set_aside_{step}')
    self._manager.reload()

  def restore(self, step, state, data_iter):
    """Restores checkpoint `step`; see `restore_or_keep`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    stored = self._manager.item_metadata(step)['state']
    target = abstract
    if hasattr(abstract, 'params'):  # a TrainState (tests save plain dicts)
      _check_shapes(stored, {'params': abstract.params,
                             'batch_stats': abstract.batch_stats,
                             'ema': abstract.ema},
                    f'{self.directory}/{step}', exact=True)
      if not abstract.ema and 'ema' not in stored:
        # Saved before TrainState had `ema`: read it as stored, then place
        # each array where the state has the array of the same name.
        target = _like(stored, abstract)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    data_iter.set_state(_data_iterator_state(self.directory, step))
    logging.info('Restored checkpoint %d from %s', step, self.directory)
    state = restored['state']
    return (state if target is abstract else _by_path(state, abstract),
            data_iter)

  def reached_preemption(self, step):
    """Whether a multi-process job was told to stop (SIGTERM on any
    process), agreed at `step` by all processes; False in one process,
    where the train loop handles signals itself."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def wait(self):
    """Waits for an in-flight save to be complete on disk."""
    self._manager.wait_until_finished()
    self._write_file_list()

  def maybe_save(self, step, state, data_iter, force=False, metrics=None):
    """Saves if `step` is on the interval (or `force`); returns whether.
    `metrics` ({'miou': float}) marks an evaluated step for 'best'."""
    if not force and step % self.every_steps:
      return False
    return self._save(step, state, data_iter, metrics)

  def save_final(self, step, state, data_iter, metrics=None):
    """Saves `step` unless it is already saved, then waits for the write."""
    self._manager.wait_until_finished()  # an in-flight save is not listed yet
    if step not in self._manager.all_steps() and step > 0:
      self._save(step, state, data_iter, metrics)
    self.wait()

  def _save(self, step, state, data_iter, metrics=None):
    # The interval is decided above; orbax's own policy would also save the
    # first step it sees, so it is overridden. orbax finishes the previous
    # save before it starts this one: that one's files are final.
    saved = self._manager.save(step, force=True, metrics=metrics,
                               args=self._save_args(state, data_iter))
    self._write_file_list()
    self._unlisted = step
    return saved

  def _write_file_list(self):
    """Writes FILES.json into the last step saved, once its save is
    finished (process 0)."""
    step, self._unlisted = self._unlisted, None
    if (step is not None and jax.process_index() == 0 and
        step in self._manager.all_steps()):
      write_file_list(self.directory, step)

  def _save_args(self, state, data_iter):
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(
            _IteratorSnapshot(data_iter)))

  def close(self):
    """Waits for pending writes and releases the manager."""
    self.wait()
    self._manager.close()


def check_on_corrupt(value):
  """Returns `checkpoint.on_corrupt` if it is a known setting."""
  if value not in ('raise', 'previous'):
    raise validate.ConfigError(
        f"checkpoint.on_corrupt={value!r}; use 'raise' or 'previous'.")
  return value


class CheckpointError(validate.UserError):
  """A checkpoint that is damaged or cannot be read."""


FILE_LIST = 'FILES.json'


def write_file_list(directory, step):
  """Records every file of a finished step folder and its size in
  `<step>/FILES.json`, so that a later missing or truncated file is found
  and named (`verify`)."""
  root = pathlib.Path(directory, str(step))
  sizes = {str(f.relative_to(root)): f.stat().st_size
           for f in sorted(root.rglob('*')) if f.is_file()
           and f.name != FILE_LIST}
  tmp = root / f'{FILE_LIST}.tmp'
  tmp.write_text(json.dumps(sizes, indent=0))
  tmp.replace(root / FILE_LIST)


def verify(directory, step):
  """Raises `CheckpointError` naming the first file of checkpoint `step`
  that is missing or not the size it was written with (checkpoints
  without a file list, e.g. the newest while its save was cut short, are
  left to orbax)."""
  root = pathlib.Path(directory, str(step))
  listed = root / FILE_LIST
  if not listed.exists():
    return
  for name, size in json.loads(listed.read_text()).items():
    path = root / name
    if not path.exists():
      raise CheckpointError(f'Checkpoint {root} is damaged: {path} is '
                            'missing.')
    if path.stat().st_size != size:
      raise CheckpointError(
          f'Checkpoint {root} is damaged: {path} has '
          f'{path.stat().st_size} bytes, {size} were written.')


def restore_variables(directory, step, abstract):
  """Restores part of a checkpoint's train state: the leaves of `abstract`.

  For inference: the optimizer state is not read.

  Args:
    directory: the checkpoint folder (`<workdir>/checkpoints`).
    step: 'latest', 'best' (highest validation mIoU kept) or a step number
      (int or digit string).
    abstract: dict of train-state fields to read (e.g. 'params',
      'batch_stats', 'step') holding `jax.ShapeDtypeStruct`s with shardings.

  Returns:
    (dict like `abstract` with arrays, the step restored).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise validate.MissingFileError(
        f'No checkpoints: {directory} does not exist; train first or check '
        '--workdir.')
  # The data-iterator item is registered, not read, so that orbax does not
  # warn that it cannot restore it.
  with ocp.CheckpointManager(directory, item_handlers=_item_handlers(
      ocp.PyTreeCheckpointHandler())) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise validate.MissingFileError(
          f'No complete checkpoint in {directory}.')
    if step in ('latest', None, ''):
      step = steps[-1]
    elif step == 'best':
      best = _best(manager)
      if best is None:
        raise validate.ConfigError(
            f'--checkpoint=best: no checkpoint in {directory} was saved '
            f'with a validation mIoU (steps {steps}); use "latest" or a step.')
      step = best[0]
    elif str(step).isdigit() and int(step) in steps:
      step = int(step)
    else:
      raise validate.ConfigError(
          f'--checkpoint={step!r}: {directory} holds steps {steps}; use one '
          'of them, "latest" or "best".')
    verify(directory, step)
    _check_shapes(manager.item_metadata(step)['state'], abstract,
                  f'{directory}/{step}')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract))))['state']
  logging.info('Restored %s of checkpoint %d from %s', sorted(abstract),
               step, directory)
  return restored, step


def _miou(metrics):
  return metrics['miou']


def _best(manager):
  """(step, mIoU) of the kept checkpoint with the highest stored mIoU."""
  scored = [(m['miou'], s) for s in manager.all_steps()
            if (m := manager.metrics(s)) and 'miou' in m]
  if not scored:
    return None
  miou, step = max(scored)
  return step, float(miou)


def _item_handlers(state_handler=None):
  return {'state': state_handler or ocp.StandardCheckpointHandler(),
          'data_iter': grain.checkpoint.CheckpointHandler()}


def _data_iterator_state(directory, step):
  """The data-iterator state saved at `step`, for this process.

  Every process saves the same position (global batches taken), so when
  the process count changed the first process's file serves all; a
  checkpoint of an older seg_jax (raw grain state) continues at batch
  `step` of the current stream, with a warning.
  """
  folder = pathlib.Path(directory, str(step), 'data_iter')
  own = folder / (f'process_{jax.process_index()}-of-'
                  f'{jax.process_count()}.json')
  files = [own] if own.exists() else sorted(folder.glob('process_0-of-*.json'))
  if not files:
    raise validate.MissingFileError(
        f'Checkpoint {folder.parent} has no data-iterator state '
        f'({folder}/process_*.json): it is damaged; restore another step or '
        'start a new workdir.')
  state = json.loads(files[0].read_text())
  if 'position' not in state:
    logging.warning('Checkpoint %s holds an older data-iterator state; the '
                    'data stream continues at batch %d of the current '
                    'order.', folder.parent, step)
    state = {'position': step}
  return state


def _path(keys):
  """'params/a/b' of a pytree key path (dict keys, fields, indices)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(
      k, 'idx', k)))) for k in keys)


def _shapes(tree):
  """{'params/a/b': shape} of a pytree of arrays or array metadata."""
  return {_path(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _like(stored, abstract):
  """The stored tree's structure with `abstract`'s leaves of the same path
  (shape, dtype, sharding)."""
  leaves = {_path(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  return jax.tree_util.tree_map_with_path(lambda p, _: leaves[_path(p)],
                                          stored)


def _by_path(tree, abstract):
  """`abstract`'s structure holding the arrays of `tree` of the same path."""
  arrays = {_path(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  return jax.tree_util.tree_map_with_path(lambda p, _: arrays[_path(p)],
                                          abstract)


def _check_shapes(stored, wanted, where, exact=False):
  """Raises `validate.ConfigError` naming the first parameter whose stored
  shape differs from the model the config builds, that is missing, or (with
  `exact`) that the checkpoint holds beyond the model's."""
  stored = _shapes({k: stored[k] for k in wanted if k in stored})
  wanted = _shapes(wanted)
  ema = [p for p in set(wanted) ^ set(stored) if p.startswith('ema/')]
  if ema and (exact or ema[0] in wanted):
    saved = 'with' if ema[0] in stored else 'without'
    raise validate.ConfigError(
        f'Checkpoint {where} was saved {saved} a moving average of the '
        'weights (train.ema_decay); resume with the setting it was trained '
        'with, or start a new workdir (model.init_from keeps the weights).')
  # Parameters first: the first one named is the most telling.
  for path, shape in sorted(wanted.items(),
                            key=lambda kv: not kv[0].startswith('params/')):
    if path not in stored:
      raise validate.ConfigError(
          f'Checkpoint {where} has no {path} (shape {shape}) that the '
          'config\'s model needs: was it trained with another model.name or '
          'model.kwargs? Use the config the run was trained with (or '
          'model.init_from to start a new run from its weights).')
    if stored[path] != shape:
      raise validate.ConfigError(
          f'Checkpoint {where} stores {path} with shape {stored[path]} but '
          f'the config\'s model has {shape}: was it trained with another '
          'model.num_classes or model.kwargs? Use the config the run was '
          'trained with (or model.init_from to start a new run from its '
          'weights).')
  extra = sorted(set(stored) - set(wanted))
  if exact and extra:
    raise validate.ConfigError(
        f'Checkpoint {where} holds {extra[0]} (shape {stored[extra[0]]}) '
        'that the config\'s model does not have: was it trained with another '
        'model.name or model.kwargs? Use the config the run was trained '
        'with.')


def read_state(directory, step):
  """Reads the train state stored at `step` as a pytree of arrays.

  For tools and tests that need the stored values without building a
  template: shapes and dtypes as saved, arrays on the first device,
  whatever topology wrote them.
  """
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.CheckpointManager(os.path.abspath(directory),
                             item_handlers=_item_handlers()) as manager:
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(step)['state'])
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']


def read_data_iterator_state(directory, step):
  """The JSON data-iterator state this process stored at `step`."""
  files = sorted(
      pathlib.Path(directory, str(step), 'data_iter').glob('process_*.json'))
  return [json.loads(f.read_text()) for f in files]
