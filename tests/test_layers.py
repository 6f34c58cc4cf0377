"""The package's layers point down only, with no import cycle, counting
imports inside functions; every module states its role in its first line.

The layers are the picture in docs/architecture.md. A module may import
modules of its own layer or of a layer below; an import of a higher layer
(at the top of a file or inside a function, where a cycle would hide) fails
here the day it is written.
"""

import ast
import os

import pytest

from conftest import REPO

# Bottom to top; 'data' and 'models' stand for their packages' modules.
LAYERS = (
    ('errors',),
    ('labels', 'interrupt', 'workdir', 'host_memory', 'mirror'),
    ('sharding',),
    ('models',),
    ('losses', 'metrics', 'optim', 'flops'),
    ('data',),
    ('state',),
    ('checkpoint',),
    ('steps', 'inference'),
    ('evaluators', 'crf', 'writers'),
    ('validate',),
    ('train',),
    ('cli', 'main', 'evaluate', 'predict', 'export', 'summary', 'bench',
     'data.check', 'data.to_folder', 'data.bench', 'data.samples',
     'to_onnx'),
)
PACKAGE = os.path.join(REPO, 'seg_jax')


def modules():
  """{'data.files': path} of every module of the package."""
  found = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, '.')
        found[rel[:-len('.__init__')] if rel.endswith('__init__') else
              rel] = path
  return found


def layer_of(module):
  """The layer index of a module ('data.files' -> data's)."""
  for i, names in enumerate(LAYERS):
    if module in names:
      return i
  for i, names in enumerate(LAYERS):
    if module.split('.')[0] in names:
      return i
  raise AssertionError(f'seg_jax.{module} is in no layer of LAYERS: place '
                       'it in tests/test_layers.py and docs/architecture.md.')


def imports(path, known):
  """The package modules `path` imports, anywhere in the file (functions
  included), as [(module, line)]."""
  tree = ast.parse(open(path).read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      base = node.module or ''
      subs = [f'{base}.{a.name}' for a in node.names]
      # `from pkg import module` imports the module; `from module import
      # name` the module itself.
      names = [s for s in subs if s[len('seg_jax.'):] in known] or [base]
    else:
      continue
    for name in names:
      if name.startswith('seg_jax.'):
        module = name[len('seg_jax.'):]
        while module and module not in known:  # 'data.files.read_image'
          module = module.rpartition('.')[0]
        if module:
          found.append((module, node.lineno))
  return found


def import_graph(known=None):
  known = known or modules()
  return {m: imports(p, known) for m, p in known.items()}


def upward_imports(graph):
  """'a.py:12: seg_jax.a (layer 3) imports seg_jax.b (layer 5)' lines."""
  bad = []
  for module, deps in sorted(graph.items()):
    if module == '':  # the package's own __init__
      continue
    here = layer_of(module)
    for dep, line in deps:
      if dep and layer_of(dep) > here:
        bad.append(f'seg_jax/{module.replace(".", "/")}.py:{line}: '
                   f'seg_jax.{module} (layer {here}) imports seg_jax.{dep} '
                   f'(layer {layer_of(dep)})')
  return bad


def cycles(graph):
  """Strongly connected groups of more than one module."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w, _ in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        found.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_every_module_is_placed_and_imports_point_down():
  graph = import_graph()
  assert len(graph) > 40
  assert upward_imports(graph) == []


def test_no_import_cycle_counting_imports_inside_functions():
  assert cycles(import_graph()) == []


def test_a_back_import_inside_a_function_fails(tmp_path):
  """The check sees a function-level import that points up (the way a
  cycle used to hide in validate.py)."""
  known = modules()
  path = tmp_path / 'errors.py'
  path.write_text(open(known['errors']).read() +
                  '\n\ndef f():\n  from seg_jax import train\n')
  graph = import_graph(known)
  graph['errors'] = imports(str(path), known)
  assert upward_imports(graph) == [
      f'seg_jax/errors.py:{len(path.read_text().splitlines())}: '
      'seg_jax.errors (layer 0) imports seg_jax.train (layer 11)']
  graph['train'] = graph['train'] + [('errors', 1)]
  assert ['errors', 'train'] in [sorted(set(c) & {'errors', 'train'})
                                 for c in cycles(graph)]


@pytest.mark.parametrize('module', sorted(modules()))
def test_every_module_opens_with_a_one_line_statement_of_its_role(module):
  doc = ast.get_docstring(ast.parse(open(modules()[module]).read()))
  assert doc and doc.splitlines()[0].strip(), f'seg_jax.{module}'
