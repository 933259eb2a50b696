r"""Prints the config reference (every field of experiments/base.py) as markdown tables.

  python tools/config_reference.py            # print the tables
  python tools/config_reference.py --write    # rewrite the README block between the markers
  python tools/config_reference.py --check    # exit 1 if the README block is stale

The tables are generated from the source of `experiments/base.py`, so they cannot drift
from it: each `c.<section>.<field> = <value>  # meaning` line gives one row, with the
default exactly as written there. `tests/config/test_config_reference.py` fails when README.md
holds an older version of the block.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import pathlib
import sys
import tokenize
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / 'experiments' / 'base.py'
README = REPO / 'README.md'
START_MARKER = '<!-- config-reference:start -->'
END_MARKER = '<!-- config-reference:end -->'
# Fields assigned directly on the root config (c.seed) are listed under this name.
TOP_LEVEL = ''


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field as written in the base config."""
  section: str  # '' for top-level fields such as `seed`
  name: str
  default: str  # the value's source text, e.g. "10_000" or "(1, 2, 2)"
  comment: str  # the trailing comment without '#'; '' when missing
  line: int

  @property
  def path(self) -> str:
    return f'{self.section}.{self.name}' if self.section else self.name


def _comments_by_line(source: str) -> dict[int, str]:
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip('#').strip()
  return comments


def _attribute_path(node: ast.AST, root: str) -> list[str] | None:
  """['data', 'dataset'] for `root.data.dataset`; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name) or node.id != root or not parts:
    return None
  return parts[::-1]


def parse_fields(path: pathlib.Path = BASE_CONFIG,
                 function: str = 'get_base_config') -> list[Field]:
  """The fields assigned in `function` of `path`, in source order, with their comments.

  Args:
    path: a config source file.
    function: the function that builds the ConfigDict; its first assignment
      `<name> = ml_collections.ConfigDict()` names the root variable.

  Returns:
    One `Field` per leaf assignment (section ConfigDicts themselves are skipped).
  """
  source = path.read_text(encoding='utf-8')
  tree = ast.parse(source, filename=str(path))
  funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
  if not funcs:
    raise ValueError(f'{path} has no function {function!r}; pass the function that builds '
                     'the base config.')
  body = funcs[0].body
  roots = [n.targets[0].id for n in body if isinstance(n, ast.Assign)
           and isinstance(n.targets[0], ast.Name)]
  if not roots:
    raise ValueError(f'{function} in {path} never assigns a root config (c = ConfigDict()).')
  root = roots[0]
  comments = _comments_by_line(source)
  fields = []
  for node in ast.walk(funcs[0]):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    parts = _attribute_path(node.targets[0], root)
    if parts is None or len(parts) > 2:
      continue
    value_src = ast.get_source_segment(source, node.value)
    if 'ConfigDict' in value_src:
      continue  # a section, not a field
    section, name = (parts[0], parts[1]) if len(parts) == 2 else (TOP_LEVEL, parts[0])
    fields.append(Field(section=section, name=name, default=' '.join(value_src.split()),
                        comment=comments.get(node.end_lineno, ''), line=node.lineno))
  return sorted(fields, key=lambda f: f.line)


def _cell(text: str) -> str:
  # A literal '|' would end the table cell, also inside backticks (GFM).
  return text.replace('|', r'\|')


def render(fields: Sequence[Field]) -> str:
  """Markdown: a short preamble, then one table of every field in source order.

  One table rather than one per section keeps the README short; the dotted paths
  (`data.dataset`) already name each field's section.
  """
  out = [
      'Every config field, its default in `experiments/base.py` and what it means. Generated '
      'from that file by `python tools/config_reference.py --write` (a test fails when this '
      'block is stale). Override any of them as `--config.<section>.<field>=value`.',
      '',
      '| field | default | meaning |',
      '|---|---|---|',
  ]
  out += [f'| `{_cell(f.path)}` | `{_cell(f.default)}` | {_cell(f.comment)} |' for f in fields]
  return '\n'.join(out) + '\n'


def replace_block(readme_text: str, block: str) -> str:
  """`readme_text` with the text between the markers replaced by `block`."""
  start = readme_text.find(START_MARKER)
  end = readme_text.find(END_MARKER)
  if start < 0 or end < start:
    raise ValueError(f'README.md lacks the markers {START_MARKER} ... {END_MARKER} (in that '
                     'order); add them where the config reference belongs.')
  head = readme_text[:start + len(START_MARKER)]
  return f'{head}\n{block}{readme_text[end:]}'


def readme_block(readme_text: str) -> str:
  """The text currently between the markers (what `replace_block` would overwrite)."""
  start = readme_text.find(START_MARKER)
  end = readme_text.find(END_MARKER)
  if start < 0 or end < start:
    raise ValueError(f'README.md lacks the markers {START_MARKER} ... {END_MARKER}.')
  return readme_text[start + len(START_MARKER):end].removeprefix('\n')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--write', action='store_true', help='rewrite the block in README.md')
  mode.add_argument('--check', action='store_true', help='exit 1 if README.md is stale')
  args = parser.parse_args(argv)
  block = render(parse_fields())
  if not (args.write or args.check):
    sys.stdout.write(block)
    return 0
  text = README.read_text(encoding='utf-8')
  if args.check:
    if readme_block(text) != block:
      print(f'{README} has a stale config reference; run python tools/config_reference.py '
            '--write', file=sys.stderr)
      return 1
    return 0
  new_text = replace_block(text, block)
  if new_text != text:
    README.write_text(new_text, encoding='utf-8')
    print(f'updated the config reference in {README}')
  else:
    print(f'{README} is up to date')
  return 0


if __name__ == '__main__':
  sys.exit(main())
