"""BENCHMARKS.md's CPU tables from one command: every train and inference
row, each the median of --runs runs of `python -m seg_jax.bench` (one
process per row and run, the rows one after the other, then again), and
with --baseline the U-Net step A/B interleaved against another checkout.

    python benchmarks/bench_table.py [--runs=3] [--only=SUBSTR]
        [--mode=train|infer]
        [--baseline=/path/to/old/checkout] [--ab-pairs=2]

Run it with an interpreter that has torch and torchvision (the rows are
timed `--vs-torch`) and seg_jax importable; the baseline runs with the
same interpreter from its own directory (so its seg_jax is imported). It
prints each run's machine-readable line as it comes, then one markdown
table per mode: seg_jax img/s, torch eager, torch.compile, the two ratios
(median, and the runs' range), compile time, XLA's peak estimate and the
cores the step kept busy.

Not part of the installed package: a measuring tool.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['--vs-torch', '--config.compilation_cache_dir=']
TRAIN_SMALL = ['--batch=4', '--crop=128,128', '--steps=3', '--repeats=3']
TRAIN_LARGE = ['--batch=4', '--crop=256,256', '--steps=2', '--repeats=3',
               '--warmup=1']
INFER = ['--mode=infer', '--batch=1', '--crop=512,512', '--steps=3',
         '--repeats=3', '--warmup=1']
UNET = ['--config=configs/unet_camvid.py', '--steps=5', '--repeats=3']

# (label, mode, arguments of python -m seg_jax.bench)
ROWS = (
    ('fcn_resnet50 128x128', 'train',
     ['--config=configs/fcn_resnet50_voc.py'] + TRAIN_SMALL),
    ('deeplabv3_resnet50 128x128', 'train',
     ['--config=configs/deeplabv3_resnet50_voc.py'] + TRAIN_SMALL),
    ('fcn_resnet50 256x256', 'train',
     ['--config=configs/fcn_resnet50_voc.py'] + TRAIN_LARGE),
    ('deeplabv3_resnet50 256x256', 'train',
     ['--config=configs/deeplabv3_resnet50_voc.py'] + TRAIN_LARGE),
    ('unet (unet_camvid) 176x240', 'train', UNET),
    ('fcn_resnet50', 'infer', ['--config=configs/fcn_resnet50_voc.py'] + INFER),
    ('deeplabv3_resnet50', 'infer',
     ['--config=configs/deeplabv3_resnet50_voc.py'] + INFER),
    ('deeplabv3_mobilenet_v3_large', 'infer',
     ['--config=configs/deeplabv3_mobilenet_v3_large_voc.py'] + INFER),
    ('lraspp_mobilenet_v3_large', 'infer',
     ['--config=configs/lraspp_mobilenet_v3_large_voc.py'] + INFER),
)


def bench(args, cwd=REPO, torch=True):
  """The fields of one `seg_jax.bench` run's machine-readable line."""
  cmd = [sys.executable, '-m', 'seg_jax.bench'] + args + (
      COMMON if torch else ['--config.compilation_cache_dir='])
  out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                       check=False)
  for line in reversed(out.stdout.splitlines()):
    if line.startswith('images_per_sec='):
      return {k: float(v) for k, v in
              (field.split('=', 1) for field in line.split())}
  raise RuntimeError(f'{" ".join(cmd)} (in {cwd}) printed no result:\n'
                     f'{out.stdout[-2000:]}\n{out.stderr[-2000:]}')


def _values(runs, key):
  return [r[key] for r in runs if key in r]


def _cell(runs, key, digits=3):
  values = _values(runs, key)
  if not values:
    return '-'
  return f'{statistics.median(values):.{digits}g}'


def _ratio(runs, key):
  values = _values(runs, key)
  if not values:
    return '-'
  return (f'**{statistics.median(values):.2f}x** '
          f'({min(values):.2f}-{max(values):.2f})')


def table(results, mode):
  lines = ['| model | seg_jax img/s | torch eager | torch.compile | '
           'ratio eager (runs) | ratio compile (runs) | compile s | peak GiB '
           '| busy |', '|---|---|---|---|---|---|---|---|---|']
  for label, row_mode, _ in ROWS:
    runs = results.get(label)
    if row_mode != mode or not runs:
      continue
    lines.append(
        f'| `{label}` | {_cell(runs, "images_per_sec")} | '
        f'{_cell(runs, "torch_eager")} | {_cell(runs, "torch_compile")} | '
        f'{_ratio(runs, "ratio_eager")} | {_ratio(runs, "ratio_compile")} | '
        f'{_cell(runs, "compile_s", 2)} | {_cell(runs, "peak_gib", 2)} | '
        f'{_cell(runs, "cores_busy", 3)} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--only', default='',
                      help='only the rows whose label contains this')
  parser.add_argument('--mode', default='', choices=('', 'train', 'infer'),
                      help='only the rows of this mode')
  parser.add_argument('--baseline', default='',
                      help='a checkout to time the U-Net step against')
  parser.add_argument('--ab-pairs', type=int, default=2)
  args = parser.parse_args()
  rows = [r for r in ROWS
          if args.only in r[0] and args.mode in ('', r[1])]
  results = {}
  start = time.time()
  for run in range(args.runs):
    for label, mode, bench_args in rows:
      fields = bench(bench_args)
      results.setdefault(label, []).append(fields)
      print(f'run {run + 1} {mode} {label}: ' +
            ' '.join(f'{k}={v:.4g}' for k, v in fields.items()), flush=True)
  steps = []
  for pair in range(args.ab_pairs if args.baseline else 0):
    for name, cwd in (('baseline', args.baseline), ('this', REPO)):
      ms = bench(UNET, cwd=cwd, torch=False)['step_s'] * 1e3
      steps.append((name, ms))
      print(f'unet A/B pair {pair + 1} {name}: {ms:.0f} ms a step', flush=True)
  print(f'\n({(time.time() - start) / 60:.1f} minutes)\n')
  for mode in ('train', 'infer'):
    if any(r[1] == mode for r in rows):
      print(f'{mode}:\n{table(results, mode)}\n')
  if steps:
    pairs = [(steps[i][1], steps[i + 1][1]) for i in range(0, len(steps), 2)]
    print('unet step, baseline / this: ' + ', '.join(
        f'{old:.0f} / {new:.0f} ms ({old / new:.2f}x)' for old, new in pairs))


if __name__ == '__main__':
  main()
