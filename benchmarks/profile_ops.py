"""Where a step's time goes, operation by operation: a `jax.profiler` trace
of the compiled train or predict step (the ones `seg_jax.bench` times),
with each XLA operation's time summed over the trace and grouped.

    python benchmarks/profile_ops.py --config=configs/unet_camvid.py \\
        [--mode=train|infer] [--batch=N] [--crop=H,W] [--steps=5] [--top=30]

Prints the step's wall time, then the --top operations by time per step
(the name XLA gave the operation, its output shape and the model layer it
comes from) and the time per kind: library products and convolutions
(`ynn_fusion`, YNNPACK), XLA's own convolutions, transposes and copies,
reductions, other elementwise work. On CPU the times are summed over the
thunk executor's threads, so their total can exceed the wall time when
operations run side by side; events of the runtime on those threads
(waits between devices) are summed apart. Times are summed over devices
too: profile on one device (the default on a CPU machine) to read them
as a step's.

XLA's own convolutions (Eigen's, with oneDNN's matrix kernels) run
asynchronously on the intra-op threads: the trace times only their
launch. The line "intra-op threads" gives those threads' CPU time over
the traced steps (from /proc) and the part of it outside every traced
operation, which is mostly those convolutions (the U-Net's train step
on this CPU: about two thirds of its CPU time). To name the kernels
inside it, sample with `perf record -g -p PID` while the steps run, with
`DNNL_JIT_PROFILE=2` in the environment (oneDNN then writes its JIT
kernels' names to /tmp/perf-PID.map) and XLA's kernels' names appended
there from `gdb -p PID -batch -ex 'maint print msymbols FILE'` (the
`<in-memory@...>` objects). Not part of the installed package: a
measuring tool.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

from common import get_config  # benchmarks/common.py


def _kind(name, hlo_line):
  if name.startswith('ynn_fusion'):
    return 'YNNPACK products/convolutions'
  if 'convolution(' in hlo_line:
    return "XLA's convolutions"
  if 'transpose' in name or 'copy' in name:
    return 'transposes/copies'
  if 'reduce' in name:
    return 'reductions'
  return 'other elementwise'


def _op_times(trace_dir):
  """{operation name: total ns} and the summed wall time of the steps."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))[-1]
  ops, wall = collections.Counter(), 0
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if 'wait for completion' in event.name:
          wall += event.duration_ns
        elif (line.name.startswith('tf_XLAEigen') and
              not event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool'))):
          ops[event.name] += event.duration_ns
  return ops, wall


def _intra_op_cpu_ns():
  """CPU time (ns) of this process's intra-op (tf_XLAEigen) threads."""
  total = 0
  for task in os.listdir('/proc/self/task'):
    try:
      with open(f'/proc/self/task/{task}/stat') as f:
        stat = f.read()
    except OSError:
      continue  # the thread ended
    name = stat[stat.index('(') + 1:stat.rindex(')')]
    if name.startswith('tf_XLAEigen'):
      fields = stat[stat.rindex(')') + 2:].split()
      total += int(fields[11]) + int(fields[12])  # utime + stime, ticks
  return total * 1e9 / os.sysconf('SC_CLK_TCK')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--mode', default='train', choices=('train', 'infer'))
  parser.add_argument('--batch', type=int, default=0)
  parser.add_argument('--crop', default='')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=30)
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])
  import jax  # pylint: disable=g-import-not-at-top
  from seg_jax import bench, sharding  # pylint: disable=g-import-not-at-top

  config = bench.configure(get_config(args.config),
                           args.batch, args.crop.split(',') if args.crop
                           else ())
  step, step_args = bench.build(config, sharding.create_mesh(), args.mode)
  compiled = step.lower(*step_args).compile()

  def run(n):
    nonlocal step_args
    out = None
    for _ in range(n):
      out = compiled(*step_args)
      if args.mode == 'train':
        step_args = (out[0],) + tuple(step_args[1:])
    jax.block_until_ready(out)

  run(2)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    cpu_before = _intra_op_cpu_ns()
    run(args.steps)
    cpu = _intra_op_cpu_ns() - cpu_before
    jax.profiler.stop_trace()
    ops, wall = _op_times(trace_dir)
  text = compiled.as_text()
  lines = {}
  for line in text.splitlines():
    found = re.match(r'\s*(?:ROOT )?%([\w.-]+) = ', line)
    if found:
      lines[found.group(1)] = line
  # Runtime events on the same threads (e.g. 'Rendezvous' between
  # devices) are no operation of the step: reported apart.
  runtime = sum(ns for name, ns in ops.items() if name not in lines)
  ops = collections.Counter({name: ns for name, ns in ops.items()
                             if name in lines})
  per_step = lambda ns: ns / 1e6 / args.steps
  print(f'{args.config} {args.mode}: {per_step(wall):.1f} ms a step (wall), '
        f'{per_step(sum(ops.values())):.1f} ms of operations, '
        f'{per_step(runtime):.1f} ms of runtime events')
  if os.path.isdir('/proc/self/task'):
    outside = cpu - sum(ops.values()) - runtime
    print(f'intra-op threads: {per_step(cpu):.1f} ms of CPU a step, '
          f'{per_step(max(outside, 0)):.1f} ms of it outside the traced '
          "operations (XLA's own convolutions, traced at launch only)")
  for name, ns in ops.most_common(args.top):
    line = lines[name]
    shape = re.search(r'= (\([^)]*\)|\S+) ', line)
    shape = shape.group(1).replace(' ', '') if shape else ''
    layer = re.search(r'op_name="([^"]*)"', line)
    print(f'{per_step(ns):8.2f} ms  {name:32s} {shape:28s} '
          f'{layer.group(1)[-80:] if layer else ""}')
  kinds = collections.Counter()
  for name, ns in ops.items():
    kinds[_kind(name, lines[name])] += ns
  print('by kind:')
  for kind, ns in kinds.most_common():
    print(f'{per_step(ns):8.1f} ms  {kind}')


if __name__ == '__main__':
  main()
