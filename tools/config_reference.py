r"""Prints the config references (every field of the base configs) as markdown tables.

  python tools/config_reference.py            # print the tables
  python tools/config_reference.py --write    # rewrite the blocks between the markers
  python tools/config_reference.py --check    # exit 1 if a block is stale

Two references: the tokenizer's fields (`experiments/base.py`) in README.md and the token
priors' fields (`experiments/prior_base.py`) in docs/generation.md. The tables are
generated from the sources, so they cannot drift from them: each
`c.<section>.<field> = <value>  # meaning` line gives one row, with the default exactly as
written there. `tests/config/test_config_reference.py` fails when a document holds an older
version of its block.
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
class Target:
  """A base config and the document whose marked block lists its fields."""
  config: pathlib.Path
  function: str
  document: pathlib.Path
  start: str
  end: str

  @property
  def source(self) -> str:
    return str(self.config.relative_to(REPO))


TARGETS = (
    Target(BASE_CONFIG, 'get_base_config', README, START_MARKER, END_MARKER),
    Target(REPO / 'experiments' / 'prior_base.py', 'get_prior_config',
           REPO / 'docs' / 'generation.md', '<!-- prior-config-reference:start -->',
           '<!-- prior-config-reference:end -->'),
)


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


def render(fields: Sequence[Field], source: str = 'experiments/base.py') -> str:
  """Markdown: a short preamble, then one table of every field in source order.

  One table rather than one per section keeps the README short; the dotted paths
  (`data.dataset`) already name each field's section.
  """
  out = [
      f'Every config field, its default in `{source}` and what it means. Generated '
      'from that file by `python tools/config_reference.py --write` (a test fails when this '
      'block is stale). Override any of them as `--config.<section>.<field>=value`.',
      '',
      '| field | default | meaning |',
      '|---|---|---|',
  ]
  out += [f'| `{_cell(f.path)}` | `{_cell(f.default)}` | {_cell(f.comment)} |' for f in fields]
  return '\n'.join(out) + '\n'


def replace_block(readme_text: str, block: str, start_marker: str = START_MARKER,
                  end_marker: str = END_MARKER) -> str:
  """`readme_text` with the text between the markers replaced by `block`."""
  start = readme_text.find(start_marker)
  end = readme_text.find(end_marker)
  if start < 0 or end < start:
    raise ValueError(f'the document lacks the markers {start_marker} ... {end_marker} (in '
                     'that order); add them where the config reference belongs.')
  head = readme_text[:start + len(start_marker)]
  return f'{head}\n{block}{readme_text[end:]}'


def readme_block(readme_text: str, start_marker: str = START_MARKER,
                 end_marker: str = END_MARKER) -> str:
  """The text currently between the markers (what `replace_block` would overwrite)."""
  start = readme_text.find(start_marker)
  end = readme_text.find(end_marker)
  if start < 0 or end < start:
    raise ValueError(f'the document lacks the markers {start_marker} ... {end_marker}.')
  return readme_text[start + len(start_marker):end].removeprefix('\n')


def expected_block(target: Target) -> str:
  return render(parse_fields(target.config, target.function), target.source)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--write', action='store_true', help='rewrite the marked blocks')
  mode.add_argument('--check', action='store_true', help='exit 1 if a block is stale')
  args = parser.parse_args(argv)
  status = 0
  for target in TARGETS:
    block = expected_block(target)
    if not (args.write or args.check):
      sys.stdout.write(block + '\n')
      continue
    text = target.document.read_text(encoding='utf-8')
    if args.check:
      if readme_block(text, target.start, target.end) != block:
        print(f'{target.document} has a stale config reference; run python '
              'tools/config_reference.py --write', file=sys.stderr)
        status = 1
      continue
    new_text = replace_block(text, block, target.start, target.end)
    if new_text != text:
      target.document.write_text(new_text, encoding='utf-8')
      print(f'updated the config reference in {target.document}')
    else:
      print(f'{target.document} is up to date')
  return status


if __name__ == '__main__':
  sys.exit(main())
