"""Stop signals (Ctrl-C, SIGTERM): a clean exit at any moment, compilation
included, and training that finishes its step and saves first.

A CLI calls `install()` first thing, before jax is imported. From then on
the signals are read by a watcher thread (through `signal.set_wakeup_fd`),
which acts at once even while the main thread is inside a long C call such
as an XLA compilation, and Python never raises KeyboardInterrupt (which,
raised out of a compilation, used to end in a segmentation fault at exit).
Outside training a signal ends the program at once with one line and exit
status 128 + the signal number: nothing is lost, as nothing is being
trained. Inside `deferred()` (the training loop) the first signal is only
recorded: the loop finishes its step, saves and stops; a second signal ends
the program at once, keeping the checkpoints already saved (a save cut
short is never restored from). In a process of a multi-process job, where
JAX's preemption notice (SIGTERM) makes every process stop at the same
step, a first Ctrl-C (SIGINT) is sent on to this process as SIGTERM.

Imports only the standard library.
"""

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a loop inside `deferred()` does on a first signal, and what a second
# one (which stops at once) keeps: the training loop's by default.
TRAINING = ('finishing the step, saving a checkpoint, then stopping',
            'the checkpoints saved so far are kept')


class _Stop:
  """What the watcher knows: whether a loop defers signals, and the first
  signal it recorded."""

  def __init__(self):
    self.installed = False
    self.deferring = False
    self.received = None  # the first signal's name while deferring
    self.forwarding = False  # a first SIGINT becomes a SIGTERM (JAX's)
    self.forwarded = False
    self.context = 'nothing was running that could be saved'
    self.finishing = TRAINING[0]  # what `deferred()` does on a first signal
    self.kept = TRAINING[1]  # ... and what a second one keeps


_STOP = _Stop()


def install(context=None):
  """Takes over SIGINT and SIGTERM in this process (main thread only).

  Args:
    context: what the exit line says was lost, e.g. 'outputs written so far
      are kept'.

  In a child process (a grain worker re-importing the CLI) SIGINT is
  ignored instead: Ctrl-C reaches the whole process group, and the parent
  decides.
  """
  if _in_child_process():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return
  if context:
    _STOP.context = context
  if _STOP.installed:
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  for sig in SIGNALS:
    signal.signal(sig, _ignore)  # Python side: no KeyboardInterrupt
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  threading.Thread(target=_watch, args=(read_fd,), daemon=True,
                   name='seg_jax-signals').start()
  _STOP.installed = True


def _in_child_process():
  """Whether this is a worker process: started by multiprocessing, or
  being started (its parent's main module is re-imported before
  `parent_process()` is set)."""
  return (multiprocessing.parent_process() is not None or
          getattr(multiprocessing.current_process(), '_inheriting', False))


def _ignore(signum, frame):
  del signum, frame  # the watcher thread handles it


def _watch(fd):
  while True:
    for signum in os.read(fd, 64):
      _on_signal(signum)


def _on_signal(signum):
  name = signal.Signals(signum).name
  if _STOP.forwarding and not _STOP.forwarded and signum == signal.SIGINT:
    _STOP.forwarded = True
    logging.getLogger('absl').warning(
        '%s received: sent on as SIGTERM, so that every process of the job '
        'stops after the same step: %s (send it again to stop at once).',
        name, _STOP.finishing)
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice
    return
  if _STOP.forwarding and _STOP.forwarded:
    _exit(signum, f'Stopped at once by a second {name}: {_STOP.kept}.')
  if _STOP.deferring and _STOP.received is None:
    _STOP.received = name
    logging.getLogger('absl').warning(
        '%s received: %s (send it again to stop at once).', name,
        _STOP.finishing)
    return
  if _STOP.deferring:
    _exit(signum, f'Stopped at once by a second {name}: {_STOP.kept}.')
  _exit(signum, f'Stopped by {name}: {_STOP.context}.')


def _exit(signum, line):
  """Writes `line` and ends the process now, without Python's teardown."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(OSError):
    os.write(2, (line + '\n').encode())
  os._exit(128 + signum)  # pylint: disable=protected-access


def received():
  """The name of the signal recorded inside `deferred()`, or None."""
  return _STOP.received


@contextlib.contextmanager
def deferred(enabled=True, what=TRAINING):
  """Inside: the first stop signal is recorded (`received()`), not acted on.

  `what`: (what the loop does on a first signal, what a second one keeps),
  as the log and exit lines say them (default: training's).

  With `install()` done, the watcher records it; without (seg_jax used as a
  library) Python handlers do, for the duration only. `enabled=False`
  (processes of a multi-process job, where JAX agrees on SIGTERM across
  processes) records nothing: SIGTERM is JAX's, and with `install()` done
  a first SIGINT is sent on as SIGTERM (a second stops at once). The
  signal recorded is forgotten on leaving: read `received()` inside.
  """
  _STOP.received = None
  previous_what = _STOP.finishing, _STOP.kept
  _STOP.finishing, _STOP.kept = what
  try:
    if not enabled:
      _STOP.forwarding, _STOP.forwarded = _STOP.installed, False
      try:
        yield
      finally:
        _STOP.forwarding = False
    elif _STOP.installed:
      _STOP.deferring = True
      try:
        yield
      finally:
        _STOP.deferring = False
    else:
      previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
      try:
        yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)
  finally:
    _STOP.received = None
    _STOP.finishing, _STOP.kept = previous_what


def _record(signum, frame):
  """The library-use handler: record the first signal, raise on a second."""
  del frame
  name = signal.Signals(signum).name
  if _STOP.received is not None:
    raise KeyboardInterrupt(f'second {name}')
  _STOP.received = name
  logging.getLogger('absl').warning(
      '%s received: %s (send it again to stop at once).', name,
      _STOP.finishing)
