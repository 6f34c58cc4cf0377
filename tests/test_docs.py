"""The documentation: README.md, BENCHMARKS.md and docs/.

- The MkDocs site (mkdocs.yml, docs/) builds with --strict, so a broken
  link or anchor between pages, or a page left out of the nav, fails.
- Every relative link in README.md points at a file that exists, and its
  anchor, if any, at a heading of that file (GitHub's anchors).
- Every `python -m seg_jax...` command shown (in code blocks and inline
  code) names a module that exists, only flags that module defines, an
  existing config file, and config keys (--config.a.b=...) that config has.
  Flags are read from the modules' source (their flags.DEFINE_* calls and
  the shared ones of seg_jax/cli.py), so no CLI is run and nothing trained.

Fast: a few seconds, most of it the MkDocs build.
"""

import ast
import functools
import glob
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
BENCHMARKS = os.path.join(REPO, 'BENCHMARKS.md')

# The two commands README.md opens with; CI runs the second one exactly.
TRAIN_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && "
                 "pip install -e . && python -m seg_jax.main "
                 "--config=configs/unet_shapes.py --workdir=runs/unet_shapes")
TEST_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && "
                "pip install -e '.[test]' && python -m pytest -q")

# absl's own flags, accepted by every CLI (cli.run also maps -h to --help).
ABSL_HELP_FLAGS = {'help', 'helpshort', 'helpfull', 'helpxml', 'flagfile',
                   'undefok', 'h'}

# A file, folder or key that stands for the reader's own: not checked.
PLACEHOLDER = re.compile(r'<[^>]*>|\.\.\.|\bDIR\b|\bOUT\b|(^|/)[xX]\.py$')


def doc_files():
  """README.md, BENCHMARKS.md and every docs/*.md page."""
  return [README, BENCHMARKS] + sorted(
      glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True))


def rel(path):
  return os.path.relpath(path, REPO)


# ---------------------------------------------------------------------------
# Markdown: code blocks, inline code, headings, links.


def split_markdown(text):
  """(fenced code blocks, prose paragraphs); each paragraph is one line."""
  blocks, prose, fence, current = [], [], None, []
  paragraph = []
  for line in text.splitlines():
    stripped = line.strip()
    if fence is None and re.match(r'(```|~~~)', stripped):
      fence, current = stripped[:3], []
      prose.append(' '.join(paragraph))
      paragraph = []
    elif fence is not None and stripped.startswith(fence):
      fence = None
      blocks.append('\n'.join(current))
    elif fence is not None:
      current.append(line)
    elif not stripped:
      prose.append(' '.join(paragraph))
      paragraph = []
    else:
      paragraph.append(stripped)
  prose.append(' '.join(paragraph))
  assert fence is None, 'a code fence is not closed'
  return blocks, [p for p in prose if p]


INLINE_CODE = re.compile(r'(`+)(.+?)(?<!`)\1(?!`)')


def commands_in(text):
  """Every `python -m seg_jax...` command in code blocks and inline code,
  with backslash-continued lines joined; and any such command outside
  code (which would escape this check)."""
  blocks, prose = split_markdown(text)
  found, loose = [], []
  for block in blocks:
    for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
      found += segments(line)
  for paragraph in prose:
    for _, code in INLINE_CODE.findall(paragraph):
      found += segments(code)
    outside = INLINE_CODE.sub('', paragraph)
    if re.search(r'-m seg_jax', outside):
      loose.append(paragraph)
  return found, loose


def segments(line):
  """The `python -m seg_jax...` commands of one shell line, cut at `&&`,
  `||`, `;` and pipes (a `|` between words, as in --mode=train|infer, is
  a usage alternative, not a pipe)."""
  out = []
  for part in re.split(r'&&|\|\||;(?=\s|$)|\s\|\s', line):
    match = re.search(r'\bpython3? -m (seg_jax[\w.]*).*', part)
    if match and not match.group(1).endswith('.'):  # not `seg_jax...`
      out.append(match.group(0).strip())
  return out


SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)


def read_page(path):
  """A Markdown file, with pymdownx.snippets includes (--8<-- "FILE",
  relative to the repository root, as mkdocs.yml sets) expanded."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  return SNIPPET.sub(lambda m: read_page(os.path.join(REPO, m.group(1))),
                     text)


def headings(path):
  """GitHub's anchors of a Markdown file's headings (outside code)."""
  anchors, seen, fence = set(), {}, None
  for line in read_page(path).splitlines():
    stripped = line.strip()
    if fence is None and re.match(r'(```|~~~)', stripped):
      fence = stripped[:3]
    elif fence is not None:
      fence = None if stripped.startswith(fence) else fence
    else:
      match = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
      if match:
        slug = github_slug(match.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f'{slug}-{n}')
  return anchors


def github_slug(heading):
  """The anchor GitHub gives a heading."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)
  text = re.sub(r'[^\w\- ]', '', text.replace('`', '').strip().lower())
  return text.replace(' ', '-')


LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def relative_links(path):
  """(target, anchor) of every relative link outside code."""
  with open(path, encoding='utf-8') as f:
    _, prose = split_markdown(f.read())
  links = []
  for paragraph in prose:
    for target in LINK.findall(INLINE_CODE.sub('', paragraph)):
      if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
        continue
      target, _, anchor = target.partition('#')
      links.append((target, anchor))
  return links


def link_problems(path):
  """What is wrong with each relative link of a Markdown file."""
  problems = []
  for target, anchor in relative_links(path):
    full = (os.path.normpath(os.path.join(os.path.dirname(path), target))
            if target else path)
    if not os.path.exists(full):
      problems.append(f'{rel(path)}: link to {target}: no such file')
    elif anchor and not full.endswith('.md'):
      problems.append(f'{rel(path)}: link to {target}#{anchor}: an anchor '
                      'into a file that is not Markdown')
    elif anchor and anchor not in headings(full):
      problems.append(f'{rel(path)}: link to {target or ""}#{anchor}: '
                      f'{rel(full)} has no such heading')
  return problems


# ---------------------------------------------------------------------------
# CLIs: modules, their flags (from the source), configs and keys.


def _defined_flags(tree):
  """{name: is_bool} of the flags.DEFINE_*() / config_flags.DEFINE_*()
  calls in an AST, and the names of the config-file flags among them."""
  names, config_flags = {}, set()
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and
            isinstance(node.func, (ast.Attribute, ast.Name))):
      continue
    func = (node.func.attr if isinstance(node.func, ast.Attribute) else
            node.func.id)
    if not func.startswith('DEFINE'):
      continue
    name = (node.args[0] if node.args else
            next((k.value for k in node.keywords if k.arg == 'name'), None))
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
      names[name.value] = func in ('DEFINE_bool', 'DEFINE_boolean')
      if func.startswith('DEFINE_config'):
        config_flags.add(name.value)
  return names, config_flags


def _parse(path):
  with open(path, encoding='utf-8') as f:
    return ast.parse(f.read(), path)


@functools.lru_cache(maxsize=None)
def shared_flag_functions():
  """{function of seg_jax/cli.py: (flags, config flags) it defines},
  following calls between its functions (define_run_flags calls
  define_distributed_flags)."""
  tree = _parse(os.path.join(REPO, 'seg_jax', 'cli.py'))
  functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

  def flags_of(name, seen=()):
    names, configs = _defined_flags(functions[name])
    for node in ast.walk(functions[name]):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and
          node.func.id in functions and node.func.id not in seen):
        more, more_configs = flags_of(node.func.id, seen + (name,))
        names.update(more)
        configs |= more_configs
    return names, configs

  out = {name: flags_of(name) for name in functions}
  return {name: v for name, v in out.items() if v[0]}


@functools.lru_cache(maxsize=None)
def absl_flags():
  """{name: is_bool} of the flags absl.app and absl.logging define."""
  names = {name: True for name in ABSL_HELP_FLAGS}
  for module in ('absl.app', 'absl.logging'):
    names.update(_defined_flags(_parse(
        importlib.util.find_spec(module).origin))[0])
  return names


@functools.lru_cache(maxsize=None)
def module_flags(module):
  """(flags {name: is_bool}, config flags, literal --aliases the module
  rewrites itself) of a seg_jax CLI, from its source; None if the module
  does not exist."""
  try:
    spec = importlib.util.find_spec(module)
  except ModuleNotFoundError:
    spec = None
  if spec is None or not spec.origin or not spec.origin.endswith('.py'):
    return None
  tree = _parse(spec.origin)
  names, configs = _defined_flags(tree)
  shared = shared_flag_functions()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in shared):
      names.update(shared[node.func.attr][0])
      configs |= shared[node.func.attr][1]
  names.update(absl_flags())
  # e.g. bench.py maps '--vs-torch' to '--vs_torch' in sys.argv itself.
  aliases = {n.value for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r'--[\w-]+', n.value)}
  return names, configs, aliases


@functools.lru_cache(maxsize=None)
def load_config(path):
  """The ConfigDict a configs/*.py returns (repo root on sys.path, as
  the configs import `from configs import default`)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  return runpy.run_path(os.path.join(REPO, path))['get_config']()


def has_key(config, key):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False
    node = node[part]
  return True


def tokens(command):
  try:
    words = shlex.split(command, comments=True)
  except ValueError:  # an unbalanced quote in a usage line
    words = command.split()
  # Usage lines: [--flag=VALUE] and `...` for "more of the same".
  words = [w.strip('[]') for w in words]
  return [w for w in words if w and w != '...']


def command_problems(command):
  """What is wrong with one `python -m seg_jax...` command."""
  words = tokens(command)
  module = words[2]
  defined = module_flags(module)
  if defined is None:
    return [f'{module}: no such module']
  names, configs, aliases = defined
  problems, config_path, keys = [], None, []
  for i, word in enumerate(words[3:], 3):
    if not word.startswith('-') or word == '-':
      continue  # a positional argument or a flag's value
    if not word.startswith('--'):
      if word.lstrip('-') not in names:
        problems.append(f'{word}: not a flag of {module}')
      continue
    name, has_value, value = word[2:].partition('=')
    head = name.split('.', 1)[0]
    if word.split('=', 1)[0] in aliases:
      continue
    if '.' in name and head in configs:
      keys.append(name.split('.', 1)[1])
    elif name in configs:
      if not has_value and i + 1 < len(words):
        value = words[i + 1]
      config_path = value
    elif name in names:
      pass
    elif name.startswith('no') and names.get(name[2:]):
      pass  # --noflag of a boolean flag
    else:
      problems.append(f'--{name}: not a flag of {module}')
  if not configs:
    return problems
  if config_path is None:  # the run folder's stored config: default keys
    config_path = 'configs/default.py'
  if PLACEHOLDER.search(config_path) or not config_path.endswith('.py'):
    return problems
  if not os.path.isfile(os.path.join(REPO, config_path)):
    return problems + [f'--config={config_path}: no such file']
  config = load_config(config_path)
  for key in keys:
    if PLACEHOLDER.search(key) or key == 'a.b':
      continue
    if not has_key(config, key):
      problems.append(f'--config.{key}: {config_path} has no such key')
  return problems


# ---------------------------------------------------------------------------
# The tests.


def test_readme_opens_with_the_two_commands():
  with open(README, encoding='utf-8') as f:
    blocks, _ = split_markdown(f.read())
  assert blocks[:2] == [TRAIN_COMMAND, TEST_COMMAND]


def test_mkdocs_builds_strict(tmp_path):
  pytest.importorskip('mkdocs')
  pytest.importorskip('material')
  # Not --quiet: it also hides the warnings from --strict, which then
  # passes a broken anchor.
  result = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict',
       '-f', os.path.join(REPO, 'mkdocs.yml'), '-d', str(tmp_path / 'site')],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))
  output = result.stdout + result.stderr
  assert result.returncode == 0, output
  assert 'WARNING' not in output, output
  assert (tmp_path / 'site' / 'index.html').exists()


def test_readme_links_resolve():
  assert len(relative_links(README)) >= 5  # the parser found them
  problems = link_problems(README)
  assert not problems, '\n'.join(problems)


def test_docs_links_resolve_on_github_too():
  # MkDocs checks them with its own anchors; GitHub shows these pages too.
  problems = [p for path in doc_files()[2:] for p in link_problems(path)]
  assert not problems, '\n'.join(problems)


def test_benchmarks_has_no_relative_links():
  # docs/benchmarks.md includes BENCHMARKS.md, so a relative link in it
  # would resolve from docs/ on the site but from the root on GitHub.
  assert relative_links(BENCHMARKS) == []


def test_every_command_names_real_modules_flags_configs_and_keys():
  problems, count = [], 0
  for path in doc_files():
    with open(path, encoding='utf-8') as f:
      commands, loose = commands_in(f.read())
    problems += [f'{rel(path)}: put this command in code: {p[:80]}'
                 for p in loose]
    for command in commands:
      count += 1
      problems += [f'{rel(path)}: {p}\n    in: {command}'
                   for p in command_problems(command)]
  assert count >= 30, f'only {count} commands found: is the parser broken?'
  assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('command, problem', [
    ('python -m seg_jax.main --config=configs/unet_shapes.py --workdir=r '
     '--config.train.no_such_key=1', 'train.no_such_key'),
    ('python -m seg_jax.main --config=configs/no_such.py --workdir=r',
     'no such file'),
    ('python -m seg_jax.evaluate --workdir=r --no_such_flag', 'no_such_flag'),
    ('python -m seg_jax.evaluate --workdir=r --nocheckpoint', 'nocheckpoint'),
    ('python -m seg_jax.bench --config=configs/X.py --vs-torchh', 'torchh'),
    ('python -m seg_jax.no_such_cli --help', 'no such module'),
])
def test_checker_finds_mistakes(command, problem):
  assert problem in ' '.join(command_problems(command))


def test_checker_accepts_good_commands():
  for command in (
      'python -m seg_jax.main --config=configs/unet_shapes.py --workdir=DIR '
      '--config.train.num_steps=5 --nodistributed --num_processes=2',
      'python -m seg_jax.main --workdir=runs/mine --config.train.ema_decay=0',
      'python -m seg_jax.bench --config=configs/<file>.py [--vs-torch] '
      '[--mode=train|infer] [--config.a.b=value ...]',
      'python -m seg_jax.predict --workdir=DIR --out=OUT a.jpg dir/ --helpfull',
      'python -m seg_jax.data.check --config=configs/unet_shapes.py '
      '--config.data.label_map="{255: 1}"'):
    assert command_problems(command) == [], command


def test_link_checker_finds_a_broken_link(tmp_path):
  (tmp_path / 'a.md').write_text('# Top\n\n## Next step\n')
  (tmp_path / 'b.md').write_text(
      '[ok](a.md#next-step) [gone](c.md) [bad](a.md#nope) '
      '[web](https://example.com/x.md) `[code](z.md)`\n')
  problems = link_problems(str(tmp_path / 'b.md'))
  assert len(problems) == 2, problems
  assert 'c.md: no such file' in problems[0]
  assert 'no such heading' in problems[1]
