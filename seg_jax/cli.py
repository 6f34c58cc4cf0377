"""Command-line plumbing shared by seg_jax's CLIs (main, evaluate, ...)."""

import logging as pylogging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from seg_jax import errors, workdir as run_folder

# Where every config key is documented, for the CLIs' --help.
CONFIG_KEYS_HELP = ('Every config key, with its meaning, is listed in '
                    'configs/default.py; override any with '
                    '--config.a.b=value.')

_HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull')


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the logs,
  orbax's warning that a checkpoint between evaluations has no mIoU, and
  jax's note that a machine without a TPU has no TPU backend."""

  def filter(self, record):
    noisy = ('/orbax/' in record.pathname or '/grain/' in record.pathname)
    if noisy and 'did not provide metrics' in str(record.msg):
      return False
    if (record.levelno < pylogging.WARNING and
        'Unable to initialize backend' in str(record.msg)):
      return False
    return record.levelno >= pylogging.WARNING or not noisy


# What a JAX_PLATFORMS name needs: a backend plugin whose name holds one of
# these (jax_plugins packages and entry points, or the plugin modules), and
# how to install one.
_PLATFORM_PLUGINS = {'cuda': ('cuda',), 'gpu': ('cuda', 'rocm'),
                     'rocm': ('rocm',), 'tpu': ('tpu',)}
_PLATFORM_INSTALL = {'cuda': "pip install -U 'jax[cuda12]'",
                     'gpu': "pip install -U 'jax[cuda12]'",
                     'rocm': "pip install -U 'jax[rocm]'",
                     'tpu': "pip install -U 'jax[tpu]'"}


def check_platforms(environ=None):
  """Raises `ConfigError` when $JAX_PLATFORMS asks for a backend no
  installed plugin provides (JAX itself fails then with a bare assertion)."""
  value = (os.environ if environ is None else environ).get('JAX_PLATFORMS')
  wanted = [p for p in (value or '').lower().split(',')
            if p in _PLATFORM_PLUGINS]
  if not wanted:
    return
  plugins = _installed_plugins()
  for platform in wanted:
    if not any(key in name for key in _PLATFORM_PLUGINS[platform]
               for name in plugins):
      raise errors.ConfigError(
          f'JAX_PLATFORMS={value}: this JAX ({jax.__version__}) has no '
          f'{platform.upper()} backend installed '
          f'({_PLATFORM_INSTALL[platform]}); or unset JAX_PLATFORMS to run '
          'on the devices it has.')


def _installed_plugins():
  """Names of the installed JAX backend plugins (lower case)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  names = {ep.name for ep in importlib.metadata.entry_points(
      group='jax_plugins')}
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  except ImportError:
    pass
  for module in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu'):
    if importlib.util.find_spec(module) is not None:
      names.add(module)
  return {n.lower() for n in names}


def quiet_library_logs():
  """Filters library INFO lines out of absl's log handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _register_for_caller(names):
  """Makes flags `names` key flags of the CLI module that called the
  function calling this, so that its --help lists them."""
  module = sys._getframe(2).f_globals.get('__name__')  # pylint: disable=protected-access
  module = sys.argv[0] if module == '__main__' else module
  for name in names:
    flags.FLAGS.register_flag_by_module(module, flags.FLAGS[name])


def define_run_flags(config_help, workdir_help):
  """--config (a configs/*.py, overridable; default: the run folder's
  stored config.json), --workdir and the multi-process flags
  (`define_distributed_flags`): the flags of the CLIs that work on a
  training run's folder. They are key flags of the calling CLI, so its
  --help lists them."""
  config_flags.DEFINE_config_file(
      'config', None, f'{config_help} Default: the config.json that '
      f'training wrote into --workdir. {CONFIG_KEYS_HELP}', lock_config=True)
  flags.DEFINE_string('workdir', None, workdir_help)
  define_distributed_flags()
  flags.mark_flags_as_required(['workdir'])
  _register_for_caller(('config', 'workdir', 'distributed',
                        'coordinator_address', 'num_processes', 'process_id'))


def define_inference_flags(crf=True):
  """--checkpoint, --evaluator (with --evaluators as its alias), --tta and
  (with `crf`) --crf: the inference flags evaluate, predict and export
  share; `inference_names` reads them. Key flags of the calling CLI."""
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' (the "
                      'highest validation mIoU kept) or a step number.')
  flags.DEFINE_list('evaluator', [], 'Inference settings: keys of '
                    'eval.evaluators (e.g. whole, slide, tta; evaluate takes '
                    'several). Default: the first of eval.in_training, as '
                    'training reports it.')
  flags.DEFINE_alias('evaluators', 'evaluator')
  flags.DEFINE_bool('tta', False, "Shorthand for --evaluator=tta: the 'tta' "
                    'evaluator\'s multi-scale + flip inference.')
  names = ['checkpoint', 'evaluator', 'evaluators', 'tta']
  if crf:
    flags.DEFINE_bool('crf', False, 'Refine every prediction with the dense '
                      'CRF (settings: config.crf).')
    names.append('crf')
  _register_for_caller(names)


def inference_names(config, one=False):
  """The evaluator names the inference flags ask for (`one`: exactly one)."""
  from seg_jax import inference  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  names = list(f.evaluator) + (['tta'] if f.tta else [])
  names = names or [inference.default_name(config)]
  if one and len(names) > 1:
    given = ([f'--evaluator={",".join(f.evaluator)}'] if f.evaluator else []
             ) + (['--tta (--evaluator=tta)'] if f.tta else [])
    raise errors.ConfigError(f'{" and ".join(given)} ask for '
                             f'{len(names)} evaluators ({", ".join(names)}): '
                             'give one here.')
  for name in names:
    inference.spec_from_config(config, name)  # known, and its settings valid
  return names


def stored_config_argv(argv):
  """`argv` with `--config` pointing at the run folder's stored config
  when it names none (`--config=DIR/config.json` works too)."""
  values = {}
  for i, arg in enumerate(argv):
    for name in ('config', 'workdir'):
      if arg.startswith(f'--{name}='):
        values[name] = (i, arg.split('=', 1)[1])
      elif arg == f'--{name}' and i + 1 < len(argv):
        values[name] = (i + 1, argv[i + 1])
  argv = list(argv)
  if 'config' in values:
    i, value = values['config']
    if value.endswith('.json'):
      argv[i] = argv[i].replace(value, run_folder.loader_argument(value))
    return argv
  if 'workdir' in values and os.path.isfile(
      run_folder.config_path(values['workdir'][1])):
    argv.insert(1, '--config=' + run_folder.loader_argument(
        values['workdir'][1]))
  return argv


def check_run_config(config, workdir, keys=run_folder.INFERENCE_KEYS):
  """Refuses a config that contradicts the run in `workdir` (its stored
  config.json) in one of `keys`, when the run has checkpoints; names the
  difference. Without 'train.ema_decay' in `keys` (inference), a run that
  kept a weight average may be read without it (its raw weights), but one
  that kept none cannot be asked for one."""
  if not (os.path.isfile(run_folder.config_path(workdir)) and
          run_folder.has_checkpoints(workdir)):
    return
  stored = run_folder.read_config(workdir)
  diffs = run_folder.differences(stored, config, keys)
  ema = stored.get('train', {}).get('ema_decay') or 0
  if ('train.ema_decay' not in keys and not ema > 0 and
      config.train.get('ema_decay', 0) > 0):
    raise errors.ConfigError(
        f'train.ema_decay={config.train.ema_decay} asks for the weight '
        f'average, but the run in {workdir} kept none (trained with '
        f'train.ema_decay={ema}): drop that setting.')
  if diffs:
    key, stored, given = diffs[0]
    more = (f' (it differs in {", ".join(k for k, _, _ in diffs[1:])} '
            'too)' if len(diffs) > 1 else '')
    raise errors.ConfigError(
        f'{key}={given!r} contradicts the run in {workdir}, whose '
        f'checkpoints were trained with {key}={stored!r}{more} (its '
        f'{run_folder.CONFIG_FILE}): drop that setting (or --config, to '
        'use the run\'s stored config), or use a new --workdir.')


def define_distributed_flags():
  """--distributed, --coordinator_address, --num_processes, --process_id."""
  flags.DEFINE_bool(
      'distributed', None, 'Join a multi-process JAX job '
      '(jax.distributed.initialize). Default: auto, on when more than one '
      'process is launched (--num_processes / JAX_NUM_PROCESSES > 1, a Slurm '
      'step with SLURM_NTASKS > 1, a TPU slice with several '
      'TPU_WORKER_HOSTNAMES). --distributed with no other flag lets JAX '
      'detect the cluster (Slurm, TPU VM, Open MPI).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 '
                      '(default: $JAX_COORDINATOR_ADDRESS, or detected).')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job '
                       '(default: $JAX_NUM_PROCESSES, or detected).')
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 '
                       '(default: $JAX_PROCESS_ID, or detected).')


def _env_int(env, name):
  value = env.get(name, '')
  if value and not value.lstrip('-').isdigit():
    raise errors.ConfigError(f'${name}={value!r} is not an integer.')
  return int(value) if value else None


def distributed_settings(f=None, environ=None):
  """(wanted, coordinator_address, num_processes, process_id) from the
  flags and the environment; None where JAX should detect it."""
  f = f or flags.FLAGS
  env = os.environ if environ is None else environ
  address = f.coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  n = f.num_processes if f.num_processes is not None else _env_int(
      env, 'JAX_NUM_PROCESSES')
  pid = f.process_id if f.process_id is not None else _env_int(
      env, 'JAX_PROCESS_ID')
  wanted = f.distributed
  if wanted is None:
    slurm_tasks = int(env.get('SLURM_NTASKS', '1') or 1)
    tpu_hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',')
                 if h]
    wanted = ((n or 1) > 1 or
              (slurm_tasks > 1 and 'SLURM_STEP_NODELIST' in env) or
              len(tpu_hosts) > 1)
  if wanted and n is not None and pid is not None and not 0 <= pid < n:
    raise errors.ConfigError(f'process_id={pid} is outside 0..{n - 1} '
                             f'(num_processes={n}).')
  return wanted, address, n, pid


def init_distributed():
  """Joins the multi-process JAX job the flags and environment describe
  (see `define_distributed_flags`); does nothing for a single process.

  CPU devices talk over gloo. Processes other than 0 log warnings and
  errors only.
  """
  wanted, address, n, pid = distributed_settings()
  if not wanted:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=n, process_id=pid)
  except ValueError as e:  # what the flags left out, said by jax
    raise errors.ConfigError(
        f'--distributed: {e} (--coordinator_address, --num_processes, '
        '--process_id, or their JAX_* variables).') from None
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX process %d of %d; %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def enable_compilation_cache(directory):
  """Keeps compiled XLA programs in `directory` ('' : off), so that a
  restart of the same config on the same machine loads its steps instead
  of compiling them again. `JAX_COMPILATION_CACHE_DIR`, when set, wins."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or not directory:
    return
  jax.config.update('jax_compilation_cache_dir',
                    os.path.expanduser(directory))
  # Cache every program that took a second or more to compile.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def check_not_a_file(path, flag='--out'):
  """A `ConfigError` naming `flag` when the folder `path` is a file."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f'{flag}={path} is a file; give a folder.')


def make_folder(path, flag='--out', of_file=None):
  """Creates the folder `path` (and its parents); a `ConfigError` naming
  `flag` when it is a file or cannot be created. `of_file`: the flag's
  value when it names a file to write in `path`, which the error names."""
  if of_file is None:
    check_not_a_file(path, flag)
  elif os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f'{flag}={of_file}: {path} is a file, not a '
                             'folder to write into; give another path.')
  where = ((lambda verb: f'{flag}={path}: cannot {verb} the folder')
           if of_file is None else
           (lambda verb: f'{flag}={of_file}: cannot {verb} its folder {path}'))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(f'{where("create")} ({e.strerror}).') from None
  import tempfile  # pylint: disable=g-import-not-at-top
  try:  # found now, not after the work whose results it is to hold
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise errors.ConfigError(f'{where("write in")} ({e.strerror}).') from None
  return path


def check_not_in_checkpoints(workdir):
  """Refuses a --workdir inside a run's checkpoints/ (a step folder
  included), naming the run."""
  run = run_folder.enclosing_run(workdir or '.')
  if run is not None:
    raise errors.ConfigError(
        f'--workdir={workdir} is inside the checkpoints of the training run '
        f'{run}; give --workdir={run} (and --checkpoint=STEP for a step).')


def require_config():
  """FLAGS.config; a one-line error when neither --config nor the run
  folder's config.json gives one."""
  if flags.FLAGS.config is None:
    workdir = flags.FLAGS.workdir
    if not workdir:
      raise errors.ConfigError(
          '--config is needed (or --workdir of a training run, which holds '
          f'{run_folder.CONFIG_FILE}): give --config=configs/<file>.py.')
    if not os.path.isdir(workdir):
      raise errors.ConfigError(
          f'--workdir={workdir} {errors.not_a_folder(workdir)}; give the '
          f'folder of a training run (it holds {run_folder.CONFIG_FILE}), or '
          '--config=configs/<file>.py.')
    check_not_in_checkpoints(workdir)
    raise errors.ConfigError(
        f'--config is needed: {workdir} holds no '
        f'{run_folder.CONFIG_FILE} (training writes one there); give '
        '--config=configs/<file>.py.')
  return flags.FLAGS.config


def start(argv, keys=run_folder.INFERENCE_KEYS):
  """Common start of a run-folder CLI: no stray arguments, a config (given
  or stored in the run folder) that agrees with the run's checkpoints in
  `keys`, the compilation cache (`config.compilation_cache_dir`; `run`
  quiets the library logs), `jax.distributed` when the job has
  several processes."""
  if len(argv) > 1:
    raise errors.ConfigError(f'Unexpected arguments: {argv[1:]}; every '
                             'setting is a --flag or --config.a.b=value.')
  check_not_in_checkpoints(flags.FLAGS.workdir)
  check_run_config(require_config(), flags.FLAGS.workdir, keys)
  enable_compilation_cache(flags.FLAGS.config.get('compilation_cache_dir',
                                                  ''))
  init_distributed()


def _parse_flags(argv):
  """absl's flag parsing, where a bad flag, an unknown `--config.` key or a
  config file that fails to load is one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    # A config file is loaded when first read: its errors are flag errors.
    if 'config' in flags.FLAGS and flags.FLAGS.config is not None:
      expand_home_in_config(flags.FLAGS.config)
    return rest
  except Exception as e:  # pylint: disable=broad-except
    sys.stderr.write(f'error: {_flag_error(argv, e)}\n')
    sys.exit(2)


_KWARGS = '--config.model.kwargs'
# The command line as given (`run` rewrites sys.argv for ml_collections).
GIVEN_ARGV = []


def _with_new_model_kwargs(argv):
  """`argv` where each `--config.model.kwargs.KEY=VALUE` whose KEY the
  config's model.kwargs lacks joins one `--config.model.kwargs={...}` (the
  config's kwargs and the new keys) placed before the other kwargs
  overrides: ml_collections overrides only keys a config has, and each
  model has its own options (width, output_stride, ...)."""
  flat = [a for a in argv if a.startswith(_KWARGS + '.') and '=' in a]
  if not flat or any(a.startswith(_KWARGS + '=') for a in argv):
    return argv
  _, config = _config_of(argv)
  if config is None or 'model' not in config:
    return argv
  kwargs = config.model.get('kwargs') or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  added = {}
  for a in flat:
    key, value = a[len(_KWARGS) + 1:].split('=', 1)
    if '.' not in key and key not in kwargs:
      added[key] = _literal(value)
  if not added:
    return argv
  first = next(i for i, a in enumerate(argv) if a in flat)
  rest = [a for a in argv
          if a not in flat or a[len(_KWARGS) + 1:].split('=', 1)[0]
          not in added]
  merged = f'{_KWARGS}={ {**kwargs, **added}!r}'
  return rest[:first] + [merged] + rest[first:]


def _literal(text):
  """A command-line value as Python reads it (8, True, (1, 2)), else the
  string itself."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _config_of(argv):
  """(path, config) of argv's --config (a config file, or a run folder's
  stored config), (path or None, None) when it does not load."""
  path = _flag_value(argv, 'config')
  loader = run_folder.loader_argument('')
  if path and path.startswith(loader):  # a run folder's stored config
    path = path[len(loader):]
    path = path if path.endswith('.json') else run_folder.config_path(path)
  if not path or not os.path.isfile(path.split(':', 1)[0]):
    return path, None
  try:
    import runpy  # pylint: disable=g-import-not-at-top
    return path, (run_folder.read_config(path) if path.endswith('.json')
                  else runpy.run_path(path)['get_config']())
  except Exception:  # pylint: disable=broad-except
    return path, None


def _flag_value(argv, name):
  """The value of `--name=VALUE` or `--name VALUE` in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(argv, error):
  """One line saying which flag or config key is wrong."""
  given = _flag_value(argv, 'config')
  keys = [a[len('--config.'):].split('=', 1)[0] for a in argv
          if a.startswith('--config.')]
  loader = run_folder.loader_argument('')
  if (given and not given.startswith(loader) and
      not os.path.isfile(given.split(':', 1)[0])):
    return (f'--config={given}: no such file; give a config file '
            '(configs/<file>.py) or --workdir of a training run alone.')
  if keys and not given:
    return _no_config_to_override(keys[0], _flag_value(argv, 'workdir'))
  path, config = _config_of(argv)
  for key in keys if config is not None else ():
    node = config
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        return (f'--config.{key}: {path} has no such key; every key is '
                'listed, with its meaning, in configs/default.py.')
      node = node[part]
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  causes = [l for l in lines if re.match(r'^\w+(Error|Exception): ', l)]
  cause = re.sub(r'^\w+: ', '', causes[-1]) if causes else None
  if cause and path:
    return f'--config={path}: {cause}'
  return lines[0] if lines else type(error).__name__


# Path flags whose '~' is the home folder: the shell leaves a '~' after '='
# as it is (--workdir=~/runs/a).
_PATH_FLAGS = ('--workdir=', '--out=', '--config=')
# Config keys that are paths: a leading '~' is the home folder, whether the
# value comes from a config file, the command line (--config.data.root=~/d)
# or a run folder's config.json.
PATH_KEYS = ('data.root', 'model.init_from', 'data.tfds.data_dir',
             'compilation_cache_dir')


def _expand_home(argv):
  """`argv` with a leading '~' of each path flag's value expanded."""
  return [a.split('=', 1)[0] + '=' + os.path.expanduser(a.split('=', 1)[1])
          if a.startswith(_PATH_FLAGS) and '=~' in a else a for a in argv]


def expand_home_in_config(config):
  """Expands a leading '~' of each of `config`'s `PATH_KEYS` (in place;
  loading a config file happens here, on first reading it)."""
  for key in PATH_KEYS:
    *parents, last = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, 'get') else None
    value = node.get(last) if hasattr(node, 'get') else None
    if isinstance(value, str) and value.startswith('~'):
      node[last] = os.path.expanduser(value)


def _no_config_to_override(key, workdir):
  """The error for a `--config.KEY` override with no config to apply it to
  (no --config, and no run folder's config.json)."""
  what = f'--config.{key} has no config to override'
  if workdir and not os.path.isdir(workdir):
    return (f'--workdir={workdir} {errors.not_a_folder(workdir)}, so '
            f'{what}: give the folder of a training run (it holds '
            f'{run_folder.CONFIG_FILE}), or --config=configs/<file>.py.')
  if workdir:
    return (f'{what}: {workdir} holds no {run_folder.CONFIG_FILE} '
            '(training writes one there); give --config=configs/<file>.py.')
  return f'{what}: give --config=configs/<file>.py.'


def _shipped_configs_importable():
  """The shipped configs (`configs/`, which config files import: `from
  configs import default`) importable from any working directory: the
  root of the source tree seg_jax runs from (a checkout, an editable
  install) joins the end of `sys.path` where it holds them, after the
  working directory's own."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if (os.path.isfile(os.path.join(root, 'configs', 'default.py')) and
      root not in sys.path):
    sys.path.append(root)


def run(main):
  """`absl.app.run(main)`, where `--help` (or `-h`) prints help and exits 0,
  an `errors.UserError` (or an error caused by one) is one line on stderr
  and its exit status (2 for a config error), and a run folder's stored
  config is the default `--config`.

  absl exits with status 1 after printing help; asking for help is not an
  error.
  """
  GIVEN_ARGV[:] = sys.argv
  _shipped_configs_importable()
  # ml_collections reads its overrides from sys.argv itself.
  sys.argv = _with_new_model_kwargs(stored_config_argv(_expand_home(
      ['--help' if a == '-h' else a for a in sys.argv])))
  wants_help = any(a in _HELP_FLAGS for a in sys.argv[1:])
  quiet_library_logs()
  try:
    if not wants_help:
      check_platforms()
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    if wants_help and e.code == 1:
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except
    cause = errors.user_error(e)
    if cause is None:
      raise
    sys.stderr.write(f'error: {cause}\n')
    sys.exit(cause.exit_code)
