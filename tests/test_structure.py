"""The package's import graph: one-way imports (no cycles), the layers in order, imports at the top.

Read from the source with `ast` (nothing is imported), so it fails fast and names the modules.
"""

import ast
import pathlib
import re
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'capjax'
# Optional dependencies may be imported where they are used (a user without torch never imports it).
OPTIONAL = {'torch', 'safetensors'}
# Layers, lowest first: a module may import modules of its own layer's dependencies and below only.
# A name stands for the module and, for a package, every module in it.
NEVER_IMPORTS = {
    'capjax.state': {'capjax.train', 'capjax.evaluation', 'capjax.inference', 'capjax.cli', 'capjax.serve'},
    # The export format sits beside inference (which reads it); the export mode that writes one from a
    # workdir (its provenance comes from evaluation) sits with the modes.
    'capjax.export': {'capjax.state', 'capjax.train', 'capjax.evaluation', 'capjax.inference', 'capjax.cli',
                      'capjax.serve', 'capjax.export_mode'},
    'capjax.export_mode': {'capjax.state', 'capjax.train', 'capjax.cli', 'capjax.serve'},
    'capjax.inference': {'capjax.state', 'capjax.train', 'capjax.evaluation', 'capjax.cli', 'capjax.serve',
                         'capjax.export_mode'},
    'capjax.evaluation': {'capjax.train', 'capjax.cli', 'capjax.serve'},
    'capjax.train': {'capjax.cli', 'capjax.serve'},
    'capjax.serve': {'capjax.state', 'capjax.train', 'capjax.evaluation', 'capjax.cli', 'capjax.export_mode'},
    'capjax.scst': {'capjax.train', 'capjax.inference', 'capjax.cli', 'capjax.serve'},
}
# What the training loop needs of evaluation is the loss, captioning and metrics; the report, the
# analysis that feeds it and the server are for after training (and cost imports, e.g. matplotlib pages).
TRAINING_NEVER_REACHES = (
    'capjax.cli', 'capjax.serve', 'capjax.export_mode', 'capjax.evaluation.report',
    'capjax.evaluation.markup', 'capjax.evaluation.analysis', 'capjax.evaluation.outputs',
    'capjax.evaluation.modes',
    'capjax.evaluation.comparison', 'capjax.evaluation.evaluator', 'capjax.evaluation.caption_analysis')


def _within(module: str, name: str) -> bool:
  return module == name or module.startswith(name + '.')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(tree: ast.AST, modules: set[str]):
  """(imported capjax module or top-level package, line, at module level?) for every import."""
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [f'{node.module}.{alias.name}' for alias in node.names]
      names = [n if n in modules else node.module for n in names]
    else:
      continue
    for name in names:
      yield name, node.lineno, id(node) in top_level


def _graph() -> tuple[dict[str, set[str]], list[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph, late = {}, []
  for name, path in files.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    graph[name] = set()
    for imported, line, at_top in _imports(tree, set(files)):
      if imported in files:
        graph[name].add(imported)
      if not at_top and imported.split('.')[0] not in OPTIONAL:
        late.append(f'{path.name}:{line} imports {imported} inside a function')
  return graph, late


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}  # module -> 'visiting' | 'done'

  def visit(node, trail):
    state[node] = 'visiting'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'visiting':
        return trail + [node, nxt]
      if nxt not in state:
        found = visit(nxt, trail + [node])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [])
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph, _ = _graph()
  assert 'capjax.train' in graph and graph['capjax.cli'], graph
  cycle = _find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


def test_lower_layers_never_import_higher_ones():
  graph, _ = _graph()
  assert all(any(_within(m, layer) for m in graph) for layer in NEVER_IMPORTS), 'a layer has no module'
  wrong = [f'{module} imports {imported}' for layer, banned in NEVER_IMPORTS.items()
           for module in sorted(graph) if _within(module, layer)
           for imported in sorted(graph[module]) if any(_within(imported, b) for b in banned)]
  assert not wrong, wrong


def test_training_never_imports_the_report_or_the_server():
  graph, _ = _graph()
  reached, todo = set(), ['capjax.train']
  while todo:
    module = todo.pop()
    if module not in reached:
      reached.add(module)
      todo.extend(graph[module])
  assert {'capjax.evaluation.loss', 'capjax.evaluation.captioning', 'capjax.scst'} <= reached
  wrong = sorted(m for m in reached if any(_within(m, banned) for banned in TRAINING_NEVER_REACHES))
  assert not wrong, wrong


def test_imports_are_at_the_top_of_modules():
  _, late = _graph()
  assert not late, late


def test_the_cycle_finder_finds_cycles():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


# ----------------------------------------------------------------------------------------------
# One code dialect: 2-space indentation, lines of at most 110 characters, no unused imports.

REPO = PACKAGE.parent
SOURCES = ['capjax', 'tests', 'benchmarks', 'configs', 'examples', 'launch.py']


def _python_files():
  for name in SOURCES:
    path = REPO / name
    yield from ([path] if path.is_file() else sorted(path.rglob('*.py')))


def test_blocks_are_indented_by_two_spaces():
  wrong = []
  for path in _python_files():
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      body = getattr(node, 'body', None)
      if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.For, ast.While, ast.With)) and body:
        if body[0].lineno != node.lineno and body[0].col_offset - node.col_offset != 2:
          wrong.append(f'{path.relative_to(REPO)}:{body[0].lineno}')
  assert not wrong, wrong[:20]


def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', *SOURCES], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


# ----------------------------------------------------------------------------------------------
# README's Layout table names every module and folder, and nothing that is not there.

def _layout_paths() -> set[str]:
  readme = (REPO / 'README.md').read_text()
  section = readme[readme.index('## Layout'):]
  section = section[:section.index('\n## ', 1)]
  return {p for p in re.findall(r'`([^`\s]+)`', section) if '/' in p or p.endswith('.py')}


def test_readme_layout_names_every_module_and_folder():
  named = _layout_paths()
  modules = {f'capjax/{p.name}' for p in PACKAGE.glob('*.py') if p.name != '__init__.py'}
  packages = {f'capjax/{p.name}/' for p in PACKAGE.iterdir() if (p / '__init__.py').exists()}
  folders = {f'{name}/' for name in ('capjax', 'configs', 'tests', 'benchmarks', 'docs')} - {'capjax/'}
  missing = sorted((modules | packages | folders | {'launch.py'}) - named)
  assert not missing, f"README's Layout table does not name {missing}"
  gone = sorted(p for p in named if '/' in p and not (REPO / p).exists())
  assert not gone, f"README's Layout table names paths that do not exist: {gone}"
