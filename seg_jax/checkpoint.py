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

  Args:
    directory: checkpoint folder (created if needed).
    every_steps: save when step % every_steps == 0.
    max_to_keep: number of most recent checkpoints kept.
  """

  def __init__(self, directory, every_steps, max_to_keep):
    directory = os.path.abspath(directory)  # orbax rejects relative paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_handlers=_item_handlers())
    self.directory = directory
    self.every_steps = every_steps

  def latest_step(self):
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def restore_or_keep(self, state, data_iter):
    """Restores the latest checkpoint into (state, data_iter) if one exists.

    Args:
      state: a freshly initialised `TrainState`; its shapes, dtypes and
        shardings are the template.
      data_iter: a fresh grain iterator; its position is set in place.

    Returns:
      (state, data_iter): restored, or the inputs when there is nothing.
    """
    step = self.latest_step()
    if step is None:
      return state, data_iter
    return self.restore(step, state, data_iter)

  def restore(self, step, state, data_iter):
    """Restores checkpoint `step`; see `restore_or_keep`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    if hasattr(abstract, 'params'):  # a TrainState (tests save plain dicts)
      _check_shapes(self._manager.item_metadata(step)['state'],
                    {'params': abstract.params,
                     'batch_stats': abstract.batch_stats},
                    f'{self.directory}/{step}', exact=True)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    data_iter.set_state(_data_iterator_state(self.directory, step))
    logging.info('Restored checkpoint %d from %s', step, self.directory)
    return restored['state'], data_iter

  def reached_preemption(self, step):
    """Whether a multi-process job was told to stop (SIGTERM on any
    process), agreed at `step` by all processes; False in one process,
    where the train loop handles signals itself."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def wait(self):
    """Waits for an in-flight save to be complete on disk."""
    self._manager.wait_until_finished()

  def maybe_save(self, step, state, data_iter, force=False):
    """Saves if `step` is on the interval (or `force`); returns whether."""
    if not force and step % self.every_steps:
      return False
    return self._save(step, state, data_iter)

  def save_final(self, step, state, data_iter):
    """Saves `step` unless it is already saved, then waits for the write."""
    self._manager.wait_until_finished()  # an in-flight save is not listed yet
    if step not in self._manager.all_steps() and step > 0:
      self._save(step, state, data_iter)
    self._manager.wait_until_finished()

  def _save(self, step, state, data_iter):
    # The interval is decided above; orbax's own policy would also save the
    # first step it sees, so it is overridden.
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(
            _IteratorSnapshot(data_iter))))

  def close(self):
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_variables(directory, step, abstract):
  """Restores part of a checkpoint's train state: the leaves of `abstract`.

  For inference: the optimizer state is not read.

  Args:
    directory: the checkpoint folder (`<workdir>/checkpoints`).
    step: 'latest' or a step number (int or digit string).
    abstract: dict of train-state fields to read (e.g. 'params',
      'batch_stats', 'step') holding `jax.ShapeDtypeStruct`s with shardings.

  Returns:
    (dict like `abstract` with arrays, the step restored).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints: {directory} does not exist; '
                            'train first or check --workdir.')
  # The data-iterator item is registered, not read, so that orbax does not
  # warn that it cannot restore it.
  with ocp.CheckpointManager(directory, item_handlers=_item_handlers(
      ocp.PyTreeCheckpointHandler())) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {directory}.')
    if step in ('latest', None, ''):
      step = steps[-1]
    elif str(step).isdigit() and int(step) in steps:
      step = int(step)
    else:
      raise ValueError(f'--checkpoint={step!r}: {directory} holds steps '
                       f'{steps}; use one of them or "latest".')
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
    raise FileNotFoundError(f'Checkpoint {folder.parent} has no data-iterator '
                            f'state ({folder}/process_*.json): it is damaged; '
                            'restore another step or start a new workdir.')
  state = json.loads(files[0].read_text())
  if 'position' not in state:
    logging.warning('Checkpoint %s holds an older data-iterator state; the '
                    'data stream continues at batch %d of the current '
                    'order.', folder.parent, step)
    state = {'position': step}
  return state


def _shapes(tree):
  """{'params/a/b': shape} of a pytree of arrays or array metadata."""
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in p):
          tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(stored, wanted, where, exact=False):
  """Raises `validate.ConfigError` naming the first parameter whose stored
  shape differs from the model the config builds, that is missing, or (with
  `exact`) that the checkpoint holds beyond the model's."""
  stored = _shapes({k: stored[k] for k in wanted if k in stored})
  wanted = _shapes(wanted)
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
