"""The command lines end to end, each in a fresh process: `main` trains with
TensorFlow hidden and writes event files and progress; `evaluate` restores
its checkpoint and reproduces the mIoU `main` printed; every CLI's --help."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg_jax import data

import user_data as ud
from conftest import REPO, production_env
from tb_events import images_by_tag, read_events, scalars_by_tag

TINY = 'configs/unet_shapes_tiny.py'


def _run(args, **kwargs):
  out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, **kwargs)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out


def _miou(line):
  return float(re.search(r'mIoU=([\d.]+)', line).group(1))


def test_train_without_tensorflow_then_evaluate_in_a_fresh_process(
    tmp_path, tiny_config):
  """One training run serves every check (one pytest-xdist worker runs it):
  `main` with tensorflow not installed writes event files and progress;
  `evaluate` reproduces the mIoU `main` printed and writes its report; a
  wrong checkpoint step or class count is refused with a clear message.
  Both CLIs compile with XLA's flags as users run them (not the tests'
  faster-compiling ones)."""
  workdir = str(tmp_path)
  out = _run(['tests/no_tensorflow.py', '-m', 'seg_jax.main',
              f'--config={TINY}', f'--workdir={workdir}'],
             env=production_env())
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith('Finished: step=6 ')
  miou = _miou(last)
  _check_events_and_progress(workdir, out.stderr, miou, tiny_config)
  _check_evaluate(workdir, miou, tiny_config)

  wrong = subprocess.run(
      [sys.executable, '-m', 'seg_jax.evaluate', f'--config={TINY}',
       f'--workdir={workdir}', '--checkpoint=5'], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert wrong.returncode != 0
  assert "--checkpoint='5'" in wrong.stderr and '[3, 6]' in wrong.stderr
  from seg_jax import checkpoint, sharding  # pylint: disable=g-import-not-at-top
  tiny_config.model.num_classes = 6
  with pytest.raises(ValueError, match=r'stores params/Conv_0/bias with shape '
                     r'\(5,\) but the config.s model has \(6,\)'):
    checkpoint.restore_for_inference(tiny_config, workdir, sharding.create_mesh())


def _check_events_and_progress(workdir, stderr, miou, config):
  # No import error, no warning (the workdir's own path may say it).
  assert 'tensorflow' not in stderr.replace(str(workdir), '').lower()
  assert re.search(r'step 6/6 \(100\.0%\), [\d.]+ steps/s, ETA', stderr)
  events = read_events(workdir)
  scalars = scalars_by_tag(events)
  assert set(scalars['train/loss']) == {3, 6}
  assert scalars['eval/miou'][6] == pytest.approx(miou, abs=1e-4)
  for key in ('fwiou', 'mdice', 'mfscore', 'pixel_accuracy', 'iou/circle',
              'acc/ring', 'dice/cross'):
    assert 6 in scalars[f'eval/{key}'], key
  images = images_by_tag(events)
  assert sorted(images) == ['eval/example_0', 'eval/example_1',
                            'eval/example_2']
  panel = images['eval/example_0'][6]
  assert panel.shape == (32, 96, 3)  # image | truth | prediction
  # The left third is the first val image itself.
  first = data.create_source(config, 'val')[0]['image']
  np.testing.assert_array_equal(panel[:, :32], first)


def _check_evaluate(workdir, miou, config):
  out = _run(['-m', 'seg_jax.evaluate', f'--config={TINY}',
              f'--workdir={workdir}', '--checkpoint=6'], env=production_env())
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith('Evaluated: step=6 split=val evaluator=whole ')
  assert _miou(last) == pytest.approx(miou, abs=1e-4)
  assert '| circle |' in out.stdout and 'fwIoU' in out.stdout
  stem = os.path.join(workdir, 'eval', 'val_whole_step6')
  with open(f'{stem}.json') as f:
    report = json.load(f)
  assert report['mIoU'] == pytest.approx(miou, abs=1e-4)
  assert report['class_names'] == ['background', 'circle', 'ring',
                                   'triangle', 'cross']
  assert set(report['per_class']['ring']) >= {'iou', 'acc', 'dice'}
  source = data.create_source(config, 'val')
  labelled = sum(int(np.sum(source[i]['label'] != 255))
                 for i in range(len(source)))
  assert np.sum(report['confusion_matrix']) == labelled
  with Image.open(f'{stem}_confusion.png') as im:
    assert im.size[0] > 300 and im.size[1] > 300


def test_every_cli_help_exits_zero():
  """--help exits 0 and lists the CLI's own flags: --config (saying where
  the config keys are documented) and, for those that work on a training
  run's folder, --workdir."""
  run_folder = ['seg_jax.main', 'seg_jax.evaluate', 'seg_jax.predict',
                'seg_jax.export', 'seg_jax.data.check']
  clis = run_folder + ['seg_jax.summary', 'seg_jax.bench',
                       'seg_jax.data.to_folder', 'seg_jax.data.bench',
                       'seg_jax.data.samples']
  procs = [subprocess.Popen([sys.executable, '-m', m, '--help'], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for m in clis]
  for module, proc in zip(clis, procs):
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, (module, stderr[-2000:])
    if module == 'seg_jax.data.samples':
      assert re.search(r'^  --out: ', stdout, re.M), module  # no config
      continue
    assert re.search(r'^  --config: ', stdout, re.M), (module, stdout)
    assert 'configs/default.py' in stdout, module
    if module in run_folder:
      assert re.search(r'^  --workdir: ', stdout, re.M), (module, stdout)


def test_inference_modules_do_not_import_the_training_loop():
  # What evaluate imports, at module level and inside evaluate() (summary
  # imports a subset: models, state, data.transforms).
  code = ('import sys\n'
          'import seg_jax.evaluate\n'
          'from seg_jax import (checkpoint, data, evaluators, metrics, models,\n'
          '                     sharding, state, steps)\n'
          'print(sorted(m for m in sys.modules\n'
          '             if m in ("seg_jax.train", "seg_jax.main")\n'
          '             or m.split(".")[0] == "tensorflow"))')
  out = _run(['-c', code])
  assert out.stdout.strip() == '[]'


def _error_lines(stderr):
  """stderr without absl's log lines (I/W/E1130 ...)."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r'^[IWE]\d{4} ', l)]


def _assert_one_line_errors(runs):
  """Each (module, args, pattern) of `runs`, run side by side: exit status
  2 and one line of stderr matching the pattern."""
  procs = [subprocess.Popen([sys.executable, '-m', m, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for m, args, _ in runs]
  for (module, args, pattern), proc in zip(runs, procs):
    _, stderr = proc.communicate(timeout=180)
    lines = _error_lines(stderr)
    assert proc.returncode == 2, (module, args, stderr[-2000:])
    assert len(lines) == 1 and re.search(pattern, lines[0]), (module, lines)


def test_missing_config_file_and_workdir_are_one_line_in_every_cli(tmp_path):
  clis = ['seg_jax.main', 'seg_jax.evaluate', 'seg_jax.predict',
          'seg_jax.export', 'seg_jax.data.check', 'seg_jax.data.to_folder',
          'seg_jax.summary']
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text('{}')
  runs = [(m, ['--config=configs/nope.py', f'--workdir={tmp_path}/w',
               f'--out={tmp_path}/o'],
           r'^error: --config=configs/nope.py: no such file; give a config '
           r'file \(configs/<file>.py\) or --workdir of a training run')
          for m in clis]
  runs += [('seg_jax.evaluate', [f'--workdir={tmp_path}/nowhere'],
            rf'^error: --workdir={tmp_path}/nowhere does not exist; give the '
            r'folder of a training run'),
           ('seg_jax.predict', [f'--workdir={tmp_path}/run/checkpoints',
                                f'--out={tmp_path}/o', 'x.png'],
            rf'^error: --workdir={tmp_path}/run/checkpoints is inside the '
            rf'checkpoints of the training run {tmp_path}/run; give '
            rf'--workdir={tmp_path}/run \(and --checkpoint=STEP'),
           ('seg_jax.main', [f'--config={TINY}',
                             f'--workdir={tmp_path}/run/checkpoints/4'],
            rf'^error: --workdir={tmp_path}/run/checkpoints/4 is inside the '
            rf'checkpoints of the training run {tmp_path}/run; ')]
  # A --config. override with no config to apply it to: no --config, and
  # a mistyped --workdir, or one without config.json, or none at all.
  (tmp_path / 'empty').mkdir()
  runs += [('seg_jax.main', [f'--workdir={tmp_path}/mnie',
                             '--config.train.num_steps=60'],
            rf'^error: --workdir={tmp_path}/mnie does not exist, so '
            r'--config.train.num_steps has no config to override: give the '
            r'folder of a training run \(it holds config.json\), or '
            r'--config=configs/<file>.py.$'),
           ('seg_jax.evaluate', [f'--workdir={tmp_path}/empty',
                                 '--config.eval.global_batch_size=8'],
            r'^error: --config.eval.global_batch_size has no config to '
            rf'override: {tmp_path}/empty holds no config.json \(training '
            r'writes one there\); give --config=configs/<file>.py.$'),
           ('seg_jax.data.check', ['--config.data.root=mydata'],
            r'^error: --config.data.root has no config to override: give '
            r'--config=configs/<file>.py.$'),
           ('seg_jax.predict', [f'--workdir={tmp_path}/run/config.json',
                                f'--out={tmp_path}/o', 'x.png'],
            rf'^error: --workdir={tmp_path}/run/config.json is a file, not a '
            r'folder; give the folder of a training run'),
           ('seg_jax.predict', [f'--config={TINY}', f'--workdir={tmp_path}/empty',
                                f'--out={tmp_path}/never', 'README.md'],
            rf'^error: No checkpoints: {tmp_path}/empty/checkpoints does not '
            r'exist; train first or check --workdir.$')]
  # The tools that take a config or a run folder: neither given, or a run
  # folder that is not there (one rule, `cli.require_config`).
  runs += [(m, [], r'^error: --config is needed \(or --workdir of a training '
            r'run, which holds config.json\): give --config=configs/<file>.py.$')
           for m in ('seg_jax.summary', 'seg_jax.data.check')]
  runs += [('seg_jax.summary', [f'--workdir={tmp_path}/nowhere'],
            rf'^error: --workdir={tmp_path}/nowhere does not exist; give the '
            r'folder of a training run')]
  _assert_one_line_errors(runs)
  assert not (tmp_path / 'never').exists()  # a refused run makes no --out


def test_export_refuses_unknown_platforms_and_unusable_outs(tiny_config,
                                                             tmp_path):
  """Before any checkpoint is read (there is none here)."""
  from seg_jax import errors, export  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'm.stablehlo')
  with pytest.raises(errors.ConfigError, match=r"^--platforms=cpu,gpu: 'gpu' "
                     r'is none of cpu, cuda, rocm, tpu.$'):
    export.export_model(tiny_config, str(tmp_path), out,
                        platforms=('cpu', 'gpu'))
  with pytest.raises(errors.ConfigError, match=r'^--out=.* is a folder; give '
                     r'a file name'):
    export.export_model(tiny_config, str(tmp_path), str(tmp_path))
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.ConfigError, match=(
      rf'^--out={tmp_path}/file/m.stablehlo: {tmp_path}/file is a file, not '
      r'a folder to write into; give another path.$')):
    export.export_model(tiny_config, str(tmp_path),
                        str(tmp_path / 'file' / 'm.stablehlo'))
  with pytest.raises(errors.ConfigError, match=(
      rf'^--out={tmp_path}/file/sub/m.onnx: cannot create its folder '
      rf'{tmp_path}/file/sub \(Not a directory\).$')):
    export.export_model(tiny_config, str(tmp_path),
                        str(tmp_path / 'file' / 'sub' / 'm.onnx'))
  with pytest.raises(errors.ConfigError, match=r'^--out=.*/file/sub: cannot '
                     r'create the folder \(Not a directory\).$'):
    from seg_jax import cli  # pylint: disable=g-import-not-at-top
    cli.make_folder(str(tmp_path / 'file' / 'sub'))
  (tmp_path / '50%').write_text('x')  # a '%' in the path is a character
  with pytest.raises(errors.ConfigError, match=r'^--out=.*/50%/sub: cannot '
                     r'create the folder \(Not a directory\).$'):
    cli.make_folder(str(tmp_path / '50%' / 'sub'))
  # --format follows an .onnx name; an .onnx name in another format is
  # refused, and export.load refuses an ONNX model (to_onnx.load_onnx).
  assert export.format_of(None, 'm.ONNX') == 'onnx'
  assert export.format_of(None, 'm.bin') == 'stablehlo'
  assert export.format_of('onnx', 'm.bin') == 'onnx'
  with pytest.raises(errors.ConfigError, match=r'^--out=m.onnx names an ONNX '
                     r'file but --format=stablehlo: give --format=onnx'):
    export.format_of('stablehlo', 'm.onnx')
  (tmp_path / 'x.onnx').write_bytes(b'\x08\x07')
  (tmp_path / 'x.onnx.json').write_text('{"format": "onnx"}')
  with pytest.raises(errors.ConfigError, match=r'x.onnx is an onnx model .*'
                     r'load it with seg_jax.to_onnx.load_onnx.$'):
    export.load(str(tmp_path / 'x.onnx'))
  # A write that fails (here: a full device) names the file in one line.
  if os.path.exists('/dev/full'):
    with pytest.raises(errors.ConfigError, match=r'^--out: cannot write '
                       r'/dev/full \(No space left on device\).$'):
      export._writing('/dev/full', lambda: export._write_bytes(
          '/dev/full', b'x' * 100_000))


def test_a_model_option_the_config_does_not_set_can_be_given():
  """--config.model.kwargs.KEY=VALUE works for any option of the model,
  not only those the config file sets (ml_collections overrides existing
  keys only): the new keys join one whole-dict override placed first."""
  import ast  # pylint: disable=g-import-not-at-top
  from seg_jax import cli, models  # pylint: disable=g-import-not-at-top
  config = os.path.join(REPO, 'configs', 'fcn_resnet50_voc.py')
  flags_given = ['--config.model.kwargs.output_stride=16',
                 '--config.model.kwargs.width=8', '--config.seed=3']
  argv = cli._with_new_model_kwargs(['m', f'--config={config}', *flags_given])
  assert argv[:2] == ['m', f'--config={config}']
  assert argv[3:] == [flags_given[0], flags_given[2]]
  name, value = argv[2].split('=', 1)
  assert name == '--config.model.kwargs'
  assert ast.literal_eval(value) == {'output_stride': 8, 'aux_head': True,
                                     'width': 8}
  out = _run(['-m', 'seg_jax.summary', f'--config={config}', *flags_given])
  assert out.returncode == 0, out.stderr[-2000:]
  import jax  # pylint: disable=g-import-not-at-top
  model = models.create_model('fcn_resnet50', 21, output_stride=16, width=8,
                              aux_head=True)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jax.numpy.zeros((1, 64, 64, 3)), train=False))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      shapes['params']))
  assert out.stdout.strip().splitlines()[-1].startswith(f'params={params} ')
  spaced = cli._with_new_model_kwargs(['m', '--config', config,
                                       '--config.model.kwargs.width=8'])
  assert spaced[:3] == ['m', '--config', config] and ast.literal_eval(
      spaced[3].split('=', 1)[1])['width'] == 8
  assert cli._with_new_model_kwargs(['m', f'--config={config}',
                                     '--config.seed=1']) == [
                                         'm', f'--config={config}',
                                         '--config.seed=1']


def test_bad_flags_of_the_tool_clis_are_one_line(tmp_path):
  """bench, data.bench, summary, data.samples and predict: out-of-range
  flags and impossible configs are one line and exit status 2."""
  (tmp_path / 'file').write_text('x')
  runs = [
      ('seg_jax.bench', [f'--config={TINY}', '--steps=0'],
       r'^error: flag --steps=0: 0 is not a positive integer$'),
      ('seg_jax.bench', [f'--config={TINY}', '--crop=abc'],
       r'^error: --crop: give height,width in pixels'),
      ('seg_jax.bench', [f'--config={TINY}', '--config.model.name=bogus'],
       r"^error: Unknown model.name='bogus'"),
      ('seg_jax.summary', [f'--config={TINY}', '--config.model.num_classes=0'],
       r'^error: model.num_classes=0: give an integer >= 2'),
      ('seg_jax.summary', [f'--config={TINY}', 'extra'],
       r"^error: Unexpected arguments: \['extra'\]"),
      ('seg_jax.data.bench', [f'--config={TINY}', '--workers=abc'],
       r'^error: --workers=abc: give whole numbers of at least 0'),
      ('seg_jax.data.samples', [f'--out={tmp_path}/file'],
       r'^error: --out=.*file is a file; give a folder.$'),
      ('seg_jax.data.samples', [f'--out={tmp_path}/s', '--num_images=-2'],
       r'^error: flag --num_images=-2: -2 is not a positive integer$'),
      # predict and export take one evaluator: the flags as given.
      ('seg_jax.predict', [f'--config={TINY}', f'--workdir={tmp_path}',
                           '--tta', '--evaluator=slide', f'--out={tmp_path}/p',
                           f'{tmp_path}/file'],
       r'^error: --evaluator=slide and --tta \(--evaluator=tta\) ask for 2 '
       r'evaluators \(slide, tta\): give one here.$'),
  ]
  _assert_one_line_errors(runs)


def test_a_leading_tilde_of_a_path_flag_is_the_home_folder(monkeypatch,
                                                           tmp_path):
  """The shell leaves '~' after '=' as it is; the CLIs expand it for path
  flags and for the config's path keys, from a config file or the command
  line alike."""
  from seg_jax import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', '/home/me')
  assert cli._expand_home([  # pylint: disable=protected-access
      'prog', '--workdir=~/runs/a', '--out=~', '--config=~/c.py',
      '--config.data.class_names=~a', 'x~/y', '--workdir=a~']) == [
          'prog', '--workdir=/home/me/runs/a', '--out=/home/me',
          '--config=/home/me/c.py', '--config.data.class_names=~a', 'x~/y',
          '--workdir=a~']
  from configs import unet_shapes_tiny  # pylint: disable=g-import-not-at-top
  config = unet_shapes_tiny.get_config()
  config.data.root, config.model.init_from = '~/data', '~/w'
  config.data.tfds.data_dir, config.compilation_cache_dir = '~', 'a~'
  config.data.class_names = ('~a',)
  cli.expand_home_in_config(config)
  assert (config.data.root, config.model.init_from, config.data.tfds.data_dir,
          config.compilation_cache_dir, config.data.class_names) == (
              '/home/me/data', '/home/me/w', '/home/me', 'a~', ('~a',))
  # A config file of one's own that sets data.root='~/mydata', as given to
  # a CLI: the home folder's data is found.
  home = tmp_path / 'home'
  ud.write_folder(home / 'mydata', n=8)
  ud.write_folder(home / 'mydata', n=2, split='val')
  (tmp_path / 'mine.py').write_text(
      'from configs import unet_shapes_tiny\n\n\ndef get_config():\n'
      '  c = unet_shapes_tiny.get_config()\n'
      "  c.data.name, c.data.root = 'folder', '~/mydata'\n"
      '  c.model.num_classes = 3\n  return c\n')
  out = subprocess.run(
      [sys.executable, '-m', 'seg_jax.data.check',
       f'--config={tmp_path}/mine.py'], cwd=tmp_path, capture_output=True,
      text=True, env={**os.environ, 'HOME': str(home)}, timeout=120)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert re.search(r'^train: .*8 examples', out.stdout, re.M), out.stdout
  assert re.search(r'^val: .*2 examples', out.stdout, re.M), out.stdout


def test_a_config_of_ones_own_imports_the_shipped_configs_from_any_folder(
    tmp_path):
  """A config file kept in the user's own folder, run from there, imports
  the shipped ones (`from configs import ...`) as the shipped ones do."""
  (tmp_path / 'mine.py').write_text(
      'from configs import unet_shapes_tiny\n\n\n'
      'def get_config():\n'
      '  c = unet_shapes_tiny.get_config()\n'
      '  c.data.shapes.num_val = 3\n'
      '  return c\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run(
      [sys.executable, '-m', 'seg_jax.data.check', '--config=mine.py',
       '--splits=val'], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'^val: shapes/val, 3 examples, images 32x32', out.stdout,
                   re.M), out.stdout
  assert out.stdout.rstrip().endswith('No problems found.')
