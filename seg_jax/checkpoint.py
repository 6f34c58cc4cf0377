"""Checkpoints: the one file that talks to orbax.

A checkpoint is one orbax step folder holding the train state and the
data-iterator state of every process together, so a resume continues both
the model and the data exactly where they were. Both restore onto another
topology: the state is resharded onto the new mesh (any device count, any
`mesh.shape`), and the data stream, a function of the global batch number
alone, is re-split over the new number of processes. Saves are
asynchronous and atomic: a save cut short leaves a
`*.orbax-checkpoint-tmp-*` folder that is never restored from.

Only this module knows the on-disk layout, the old layouts included:
`restore` is the one reader of a train state (for resume, inference and
tools alike), `data_position` the one reader of a data position, and the
`Checkpointer` the one owner of "best". Each finished step folder lists its
files with their sizes and CRC-32 checksums (FILES.json), so a file that
went missing, was cut short or had its bytes changed is named on restore.
"""

import json
import os
import pathlib
import zlib

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from seg_jax import errors, state as train_state
from seg_jax import workdir as run_folder


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
  a resume (its mIoU is stored beside it). The Checkpointer is the one
  owner of "best": a save whose mIoU beats it is made whatever the
  interval, and `best()` answers from it.

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
    self._best = _best(self._manager)

  def best(self):
    """(step, mIoU) of the best checkpoint saved, or None if none has one."""
    return self._best

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def restore_or_keep(self, state, data_iter):
    """Restores the latest checkpoint into (state, data_iter) if one exists.

    A damaged checkpoint (a file missing, or of another size or checksum
    than written, or one orbax cannot read) raises `CheckpointError`
    naming the file; with `on_corrupt='previous'` the next older checkpoint
    is tried instead, with a warning naming what was skipped.

    Args:
      state: a freshly initialised `TrainState`; its shapes, dtypes and
        shardings are the template.
      data_iter: a fresh grain iterator; its position is set in place.

    Returns:
      (state, data_iter): restored, or the inputs when there is nothing.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored, _ = restore(self.directory, step, state)
        data_iter.set_state(data_position(self.directory, step))
        logging.info('Restored checkpoint %d from %s', step, self.directory)
        return restored, data_iter
      except errors.ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if 'tree structures do not match' in str(e):
          # orbax: the stored state's layout is not this config's (e.g. the
          # optimizer state of another optimizer chain): not damage.
          raise errors.ConfigError(
              f'Checkpoint {self.directory}/{step} holds a train state laid '
              'out differently from the one this config builds (its '
              'optimizer state: another train.optimizer, or gradient '
              'clipping turned on or off): resume with the settings it was '
              "trained with (the run's config.json), or start a new workdir "
              '(model.init_from keeps the weights).') from None
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
    self._best = _best(self._manager)

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
    """Saves if `step` is on the interval, `force`, or `metrics`
    ({'miou': float}, an evaluated step) beat the best; returns whether."""
    if not (force or step % self.every_steps == 0 or self._beats(metrics)):
      return False
    return self._save(step, state, data_iter, metrics)

  def save_final(self, step, state, data_iter, metrics=None):
    """Saves `step` unless it is already saved, then waits for the write."""
    self._manager.wait_until_finished()  # an in-flight save is not listed yet
    if step not in self._manager.all_steps() and step > 0:
      self._save(step, state, data_iter, metrics)
    self.wait()

  def score(self, step):
    """The validation mIoU checkpoint `step` was saved with, or None."""
    return (self._manager.metrics(step) or {}).get('miou')

  def add_score(self, step, metrics):
    """Stores `metrics` ({'miou': float}) with checkpoint `step`, saved
    without them (its evaluation failed), so that it can be the best: the
    metrics item orbax writes with a save, written by orbax's own handler
    into a temporary folder and moved in, then the file list again."""
    self.wait()
    if jax.process_index() == 0:
      root = pathlib.Path(self.directory, str(step))
      tmp = root / f'{METRICS_ITEM}.tmp'
      if tmp.exists():
        for f in tmp.iterdir():
          f.unlink()
        tmp.rmdir()
      tmp.mkdir()
      ocp.handlers.JsonCheckpointHandler(filename=METRICS_ITEM).save(
          tmp, args=ocp.args.JsonSave(metrics))
      tmp.rename(root / METRICS_ITEM)
      write_file_list(self.directory, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'seg_jax_add_score_{step}')
    self._manager.reload()
    self._best = _best(self._manager)

  def _beats(self, metrics):
    return metrics is not None and (self._best is None or
                                    metrics['miou'] > self._best[1])

  def _save(self, step, state, data_iter, metrics=None):
    # The interval is decided above; orbax's own policy would also save the
    # first step it sees, so it is overridden. orbax finishes the previous
    # save before it starts this one: that one's files are final.
    # A tie goes to the later step, as orbax's BestN keeps it (and `_best`
    # reads it back).
    if metrics is not None and (self._best is None or
                                metrics['miou'] >= self._best[1]):
      self._best = (step, float(metrics['miou']))
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


def check_config(config):
  """The checkpoint section's own check (see `seg_jax.validate`)."""
  for key in ('every_steps', 'max_to_keep'):
    value = config.checkpoint[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.ConfigError(f'checkpoint.{key}={value!r}: give an integer '
                               '>= 1.')
  check_on_corrupt(config.checkpoint.on_corrupt)


def check_on_corrupt(value):
  """Returns `checkpoint.on_corrupt` if it is a known setting."""
  if value not in ('raise', 'previous'):
    raise errors.ConfigError(
        f"checkpoint.on_corrupt={value!r}; use 'raise' or 'previous'.")
  return value


class CheckpointError(errors.UserError):
  """A checkpoint that is damaged or cannot be read (`step`: its step,
  where known)."""

  def __init__(self, message, step=None):
    super().__init__(message)
    self.step = step


FILE_LIST = 'FILES.json'


def _crc32(path):
  crc = 0
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      crc = zlib.crc32(block, crc)
  return crc


def write_file_list(directory, step):
  """Records every file of a finished step folder, its size and CRC-32, in
  `<step>/FILES.json`, so that a later missing, truncated or altered file
  is found and named (`verify`)."""
  root = pathlib.Path(directory, str(step))
  listed = {str(f.relative_to(root)): {'size': f.stat().st_size,
                                       'crc32': _crc32(f)}
            for f in sorted(root.rglob('*'))
            if f.is_file() and f.name != FILE_LIST}
  tmp = root / f'{FILE_LIST}.tmp'
  tmp.write_text(json.dumps(listed, indent=0))
  tmp.replace(root / FILE_LIST)


def verify(directory, step):
  """Raises `CheckpointError` naming the first file of checkpoint `step`
  that is missing, not the size it was written with, or whose bytes
  changed (its CRC-32). Checkpoints without a file list (the newest while
  its save was cut short) are left to orbax; lists written before
  checksums existed (sizes only) are checked for sizes."""
  root = pathlib.Path(directory, str(step))
  listed = root / FILE_LIST
  if not listed.exists():
    return
  for name, entry in json.loads(listed.read_text()).items():
    size, crc = (entry, None) if isinstance(entry, int) else (
        entry['size'], entry.get('crc32'))
    path = root / name
    if not path.exists():
      raise CheckpointError(f'Checkpoint {root} is damaged: {path} is '
                            'missing.', step)
    if path.stat().st_size != size:
      raise CheckpointError(
          f'Checkpoint {root} is damaged: {path} has '
          f'{path.stat().st_size} bytes, {size} were written.', step)
    if crc is not None and _crc32(path) != crc:
      raise CheckpointError(
          f'Checkpoint {root} is damaged: the bytes of {path} changed since '
          'they were written (CRC-32 mismatch).', step)


def restore(directory, step='latest', target=None, fields=None):
  """Reads the train state of a checkpoint: the one reader, for resume,
  inference and tools.

  Args:
    directory: the checkpoint folder (`<workdir>/checkpoints`).
    step: 'latest', 'best' (highest validation mIoU kept) or a step number
      (int or digit string).
    target: the template whose shapes, dtypes and shardings the arrays get:
      a `TrainState` (or pytree) of arrays or `jax.ShapeDtypeStruct`s. None:
      everything as stored, on the first device, whatever topology wrote it.
    fields: read only these top-level fields (e.g. no optimizer state for
      inference) and return them as a dict; without a target, those of
      them the checkpoint holds (not empty).

  The stored shapes must be the target's (`errors.ConfigError` naming the
  first parameter otherwise). A state saved before a field existed (e.g.
  `ema`) restores into a target that holds that field empty: its arrays are
  read as stored and placed by name.

  Returns:
    (the state or dict of fields, the step read).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise errors.MissingFileError(
        f'No checkpoints: {directory} does not exist; train first or check '
        '--workdir.')
  # The data-iterator item is registered, not read, so that orbax does not
  # warn that it cannot restore it.
  with ocp.CheckpointManager(directory, item_handlers=_item_handlers(
      ocp.PyTreeCheckpointHandler())) as manager:
    step = _choose_step(manager, directory, step)
    where = f'{directory}/{step}'
    verify(directory, step)
    stored = manager.item_metadata(step)['state']
    if target is None:
      # This process's first device: in a multi-process job every process
      # reads its own copy.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          stored)
      if fields is not None:  # those stored, and not empty
        fields = [f for f in fields if jax.tree.leaves(stored.get(f, {}))]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if fields is not None:
      abstract = {f: _field(abstract, f) for f in fields}
    _check_shapes(stored, abstract, where, exact=fields is None)
    # Fields the state has empty but the checkpoint lacks (saved before they
    # existed): read the stored tree, then place each array by name.
    read = _like(stored, abstract) if _lacks_empty_fields(
        stored, abstract) else abstract
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=read, partial_restore=fields is not None,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                read))))['state']
  logging.info('Restored %s of checkpoint %d from %s',
               'all' if fields is None else sorted(fields), step, directory)
  return (restored if read is abstract else _by_path(restored, abstract),
          step)


def restore_for_inference(config, workdir, mesh, step='latest'):
  """The model and the variables a checkpoint of `workdir` holds.

  Only what inference uses is read (`state.inference_fields`: the weight
  average when the config keeps one, else parameters and BatchNorm
  statistics; never the optimizer state), laid out on `mesh` as training
  lays them out.

  Args:
    config: the config the checkpoint was trained with.
    workdir: the training run's folder (checkpoints under `checkpoints/`).
    mesh: device mesh the variables are placed on.
    step: 'latest', 'best' or a step number (int or digit string).

  Returns:
    (model, variables {'params', 'batch_stats'}, step restored).
  """
  abstract = train_state.abstract_train_state(config, mesh)
  fields = train_state.inference_fields(abstract)
  directory = run_folder.checkpoint_dir(workdir)
  try:
    restored, step = restore(directory, step, abstract, fields=fields)
  except CheckpointError as e:
    others = sorted(int(d) for d in os.listdir(directory)
                    if d.isdigit() and int(d) != e.step)
    if not others:
      raise
    raise CheckpointError(
        f'{e} Read another checkpoint of the run with --checkpoint=STEP '
        f'(kept: {", ".join(map(str, others))}).', e.step) from None
  return (train_state.create_model(config),
          train_state.inference_variables(restored), step)


def initial_weights_fn(config):
  """The `init_fn` (host variables -> variables) that starts a new run from
  `config.model.init_from`: a weights file (`state.pretrained_init_fn`) or
  a seg_jax run (`workdir.weights_source`: its latest step, or the step
  folder named), whose inference variables (the weight average when it kept
  one) replace the fresh ones; None without `model.init_from`.

  From a run, layers whose shape differs only by the class count (the run's
  `model.num_classes` against the config's) keep their fresh
  initialisation, as do layers the run lacks (e.g. an aux head added); the
  run's aux head is dropped when the config has none. Any other difference
  is a `ConfigError` naming the parameter.
  """
  path = config.model.init_from
  found = path and run_folder.weights_source(path)
  if not found:
    return train_state.pretrained_init_fn(config)
  directory, step, run = found

  def init_fn(variables):
    if step != 'latest' and not os.path.isdir(os.path.join(directory,
                                                          str(step))):
      held = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
      raise errors.ConfigError(
          f'model.init_from={path}: {directory} holds no step {step} (steps '
          f'{held}); name one of them, or the run folder {run} for its '
          'latest.')
    try:
      stored, read = restore(directory, step,
                             fields=('params', 'batch_stats', 'ema'))
    except errors.UserError as e:
      raise errors.ConfigError(f'model.init_from={path}: {e}') from None
    weights = train_state.inference_variables(
        {'ema': stored['ema']} if 'ema' in stored else
        {'params': stored['params'],
         'batch_stats': stored.get('batch_stats', {})})
    old_classes = None
    if os.path.isfile(run_folder.config_path(run)):
      old_classes = run_folder.read_config(run).model.num_classes
    merged, kept_fresh = _merge_weights(
        variables, jax.device_get(weights), old_classes,
        config.model.num_classes, f'model.init_from={path} (step {read})')
    logging.info('Started from %s, step %d; kept fresh: %s', run, read,
                 ', '.join(kept_fresh) or 'none')
    return merged

  return init_fn


def _merge_weights(variables, weights, old_classes, new_classes, source):
  """`variables` with every leaf `weights` has at its path and shape; a
  leaf differing only where the class count does stays fresh. Returns
  (variables, [paths kept fresh])."""
  import flax  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  given = flax.traverse_util.flatten_dict(flax.core.unfreeze(weights))
  kept = []
  # Parameters first: the first one named is the most telling.
  for path, value in sorted(given.items(), key=lambda kv: kv[0][0] != 'params'):
    name = '/'.join(str(k) for k in path)
    if path not in flat:
      if 'aux' in path:  # an auxiliary head the new model has not
        continue
      raise errors.ConfigError(
          f'{source}: {name} has no counterpart in the config\'s model: '
          'was the run another model.name or model.kwargs? Start from a run '
          'of the same model (a different class count is fine).')
    want = tuple(flat[path].shape)
    if tuple(value.shape) != want:
      if old_classes != new_classes and len(want) == value.ndim and all(
          a == b or (a, b) == (old_classes, new_classes)
          for a, b in zip(value.shape, want)):
        kept.append(name)
        continue
      unknown = ('' if old_classes is not None else ' (the run has no '
                 'config.json, so a class count that differs cannot be told '
                 'apart)')
      raise errors.ConfigError(
          f'{source}: {name} has shape {tuple(value.shape)}, the config\'s '
          f'model {want}: was the run another model.kwargs or data.channels? '
          f'Only the class count may differ{unknown}.')
    flat[path] = value.astype(flat[path].dtype)
  kept += ['/'.join(str(k) for k in p) for p in flat
           if p not in given and p[0] in ('params', 'batch_stats')]
  return flax.traverse_util.unflatten_dict(flat), sorted(kept)


def data_position(directory, step):
  """The data-iterator state this process continues from at `step`: the
  one reader of it.

  Read through grain's checkpoint handler (this process's file). Every
  process saves the same position (global batches taken), so when the
  process count changed the first process's file serves all; a checkpoint
  of an older seg_jax (raw grain state) continues at batch `step` of the
  current stream, with a warning.
  """
  directory = os.path.abspath(directory)
  reader = _StateReader()
  try:
    with ocp.CheckpointManager(directory,
                               item_handlers=_item_handlers()) as manager:
      manager.restore(step, args=ocp.args.Composite(
          data_iter=grain.checkpoint.CheckpointRestore(reader)))
  except (ValueError, FileNotFoundError, KeyError):
    # grain's handler reads process_<i>-of-<n>.json of today's topology.
    folder = pathlib.Path(directory, str(step), 'data_iter')
    first = sorted(folder.glob('process_0-of-*.json'))
    if not first:
      raise errors.MissingFileError(
          f'Checkpoint {folder.parent} has no data-iterator state '
          f'({folder}/process_*.json): it is damaged; restore another step '
          'or start a new workdir.') from None
    reader.set_state(first[0].read_bytes())
  state = reader.state
  if 'position' not in state:
    logging.warning('Checkpoint %s/%d holds an older data-iterator state; the '
                    'data stream continues at batch %d of the current '
                    'order.', directory, step, step)
    state = {'position': step}
  return state


class _StateReader:
  """Receives the JSON state grain's handler reads (no iterator to set)."""

  state = None

  def set_state(self, state):
    self.state = json.loads(state)

  def start_prefetch(self):
    pass


def _choose_step(manager, directory, step):
  """The step number 'latest', 'best' or a number names in `manager`."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise errors.MissingFileError(f'No complete checkpoint in {directory}.')
  if step in ('latest', None, ''):
    return steps[-1]
  if step == 'best':
    best = _best(manager)
    if best is None:
      raise errors.ConfigError(
          f'--checkpoint=best: no checkpoint in {directory} was saved with a '
          f'validation mIoU (steps {steps}); use "latest" or a step.')
    return best[0]
  if str(step).isdigit() and int(step) in steps:
    return int(step)
  raise errors.ConfigError(
      f'--checkpoint={step!r}: {directory} holds steps {steps}; use one of '
      'them, "latest" or "best".')


def _field(tree, name):
  return getattr(tree, name) if hasattr(tree, name) else tree[name]


def _lacks_empty_fields(stored, abstract):
  """Whether `abstract` has an empty top-level field the stored tree lacks."""
  names = (list(abstract) if isinstance(abstract, dict) else
           [f for f in ('step', 'params', 'batch_stats', 'opt_state', 'ema')
            if hasattr(abstract, f)])
  return any(not jax.tree.leaves(_field(abstract, n)) and n not in stored
             for n in names)


# The item of a step folder that holds its metrics (orbax's name for it).
METRICS_ITEM = 'metrics'


def _miou(metrics):
  return metrics['miou']


def _best(manager):
  """(step, mIoU) of the kept checkpoint with the highest stored mIoU, the
  latest of equals."""
  scored = [(m['miou'], s) for s in manager.all_steps()
            if (m := manager.metrics(s)) and 'miou' in m]
  if not scored:
    return None
  miou, step = max(scored)
  return step, float(miou)


def _item_handlers(state_handler=None):
  return {'state': state_handler or ocp.StandardCheckpointHandler(),
          'data_iter': grain.checkpoint.CheckpointHandler()}


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
  """Raises `errors.ConfigError` naming the first array whose stored shape
  differs from the one the config builds, that is missing, or (with
  `exact`) that the checkpoint holds beyond the config's state. Optimizer
  state is left out: its shapes follow the parameters'."""
  names = (list(wanted) if isinstance(wanted, dict) else
           [f for f in ('params', 'batch_stats', 'ema') if hasattr(wanted, f)])
  names = [n for n in names if n not in ('step', 'opt_state')]
  wanted = {n: _field(wanted, n) for n in names}
  stored = _shapes({k: stored[k] for k in names if k in stored})
  wanted = _shapes(wanted)
  stored_fields = {p.split('/')[0] for p in stored}
  wanted_fields = {p.split('/')[0] for p in wanted}
  missing = sorted(wanted_fields - stored_fields)
  extra = sorted(stored_fields - wanted_fields)
  for field, how in ([(f, 'without') for f in missing] +
                     [(f, 'with') for f in (extra if exact else ())]):
    if field in ('params', 'batch_stats'):
      continue  # named parameter by parameter below
    raise errors.ConfigError(
        f'Checkpoint {where} was saved {how} the train-state field '
        f"'{field}' ({train_state.FIELD_SETTINGS.get(field, 'another setting')}"
        '); resume with the settings it was trained with (the run\'s '
        'config.json), or start a new workdir (model.init_from keeps the '
        'weights).')
  # Parameters first: the first one named is the most telling.
  for path, shape in sorted(wanted.items(),
                            key=lambda kv: not kv[0].startswith('params/')):
    if path not in stored:
      raise errors.ConfigError(
          f'Checkpoint {where} has no {path} (shape {shape}) that the '
          'config\'s model needs: was it trained with another model.name or '
          'model.kwargs? Use the config the run was trained with (or '
          'model.init_from to start a new run from its weights).')
    if stored[path] != shape:
      raise errors.ConfigError(
          f'Checkpoint {where} stores {path} with shape {stored[path]} but '
          f'the config\'s model has {shape}: was it trained with another '
          'model.num_classes, model.kwargs or data.channels? Use the config '
          'the run was trained with (or model.init_from to start a new run '
          'from its weights).')
  extra = sorted(set(stored) - set(wanted))
  if exact and extra:
    raise errors.ConfigError(
        f'Checkpoint {where} holds {extra[0]} (shape {stored[extra[0]]}) '
        'that the config\'s model does not have: was it trained with another '
        'model.name or model.kwargs? Use the config the run was trained '
        'with.')


def read_state(directory, step):
  """The train state stored at `step`, as stored (see `restore`)."""
  return restore(directory, step)[0]
