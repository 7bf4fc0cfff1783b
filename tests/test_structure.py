"""The package's import graph: one-way imports (no cycles), the layers in order, imports at the top.

Read from the source with `ast` (nothing is imported), so it fails fast and names the modules.
"""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'capjax'
# Optional dependencies may be imported where they are used (a user without torch never imports it).
OPTIONAL = {'torch', 'safetensors'}
# Layers, lowest first: a module may import modules of its own layer's dependencies and below only.
NEVER_IMPORTS = {
    'capjax.state': {'capjax.train', 'capjax.evaluation', 'capjax.inference', 'capjax.cli'},
    'capjax.inference': {'capjax.state', 'capjax.train', 'capjax.evaluation', 'capjax.cli'},
    'capjax.evaluation': {'capjax.train', 'capjax.cli'},
    'capjax.train': {'capjax.cli'},
    'capjax.serve': {'capjax.state', 'capjax.train', 'capjax.evaluation', 'capjax.cli'},
    'capjax.scst': {'capjax.train', 'capjax.evaluation', 'capjax.inference', 'capjax.cli'},
}


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
  wrong = [f'{module} imports {bad}' for module, banned in NEVER_IMPORTS.items()
           for bad in sorted(graph[module] & banned)]
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
SOURCES = ['capjax', 'tests', 'benchmarks', 'configs', 'launch.py']


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
