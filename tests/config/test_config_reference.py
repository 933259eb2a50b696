"""The README config reference is generated from experiments/base.py and must match it."""

import ast
import textwrap

import pytest

from experiments import base
from tools import config_reference


def _leaf_paths(config, prefix=''):
  """Dotted paths of every leaf field of a ConfigDict, read from the object itself."""
  out = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    if hasattr(value, 'items'):
      out.update(_leaf_paths(value, path + '.'))
    else:
      out[path] = value
  return out


def test_readme_block_is_up_to_date():
  readme = config_reference.README.read_text(encoding='utf-8')
  expected = config_reference.render(config_reference.parse_fields())
  assert config_reference.readme_block(readme) == expected, (
      'README.md config reference is stale; run `python tools/config_reference.py --write`.')


def test_every_base_field_is_listed_once_with_a_comment():
  fields = config_reference.parse_fields()
  paths = [f.path for f in fields]
  assert len(paths) == len(set(paths)), f'fields assigned twice: {paths}'
  actual = _leaf_paths(base.get_base_config())
  assert set(paths) == set(actual)
  missing = [f'{f.path} (experiments/base.py:{f.line})' for f in fields if not f.comment]
  assert not missing, f'fields without a trailing "# meaning" comment: {missing}'


def test_listed_defaults_are_the_config_values():
  actual = _leaf_paths(base.get_base_config())
  for f in config_reference.parse_fields():
    assert ast.literal_eval(f.default) == actual[f.path], f.path


def test_parse_render_and_replace_on_a_small_file(tmp_path):
  src = tmp_path / 'cfg.py'
  src.write_text(textwrap.dedent('''\
      import ml_collections

      def get_base_config():
        cfg = ml_collections.ConfigDict()
        cfg.seed = 3        # the seed
        cfg.data = ml_collections.ConfigDict()
        cfg.data.spec = 'a|b'  # one | or the other
        cfg.data.size = (1,
                         2)  # wrapped value
        cfg.data.bare = 1e-4
        return cfg
      '''))
  fields = config_reference.parse_fields(src)
  assert [(f.path, f.default, f.comment) for f in fields] == [
      ('seed', '3', 'the seed'),
      ('data.spec', "'a|b'", 'one | or the other'),
      ('data.size', '(1, 2)', 'wrapped value'),
      ('data.bare', '1e-4', ''),
  ]
  table = config_reference.render(fields)
  assert "| `data.spec` | `'a\\|b'` | one \\| or the other |" in table.splitlines()
  readme = 'intro\n<!-- config-reference:start -->\nold\n<!-- config-reference:end -->\nrest\n'
  new = config_reference.replace_block(readme, table)
  assert new.startswith('intro\n<!-- config-reference:start -->\n' + table)
  assert new.endswith(table + '<!-- config-reference:end -->\nrest\n')
  assert config_reference.readme_block(new) == table
  with pytest.raises(ValueError, match='config-reference:start'):
    config_reference.replace_block('no markers here', table)


def test_check_mode_passes_on_the_repository(capsys):
  assert config_reference.main(['--check']) == 0
  assert capsys.readouterr().err == ''


@pytest.mark.parametrize('target', config_reference.TARGETS, ids=lambda t: t.config.name)
def test_every_document_block_is_up_to_date(target):
  text = target.document.read_text(encoding='utf-8')
  assert config_reference.readme_block(text, target.start, target.end) == (
      config_reference.expected_block(target)), (
          f'{target.document.name} config reference is stale; run '
          '`python tools/config_reference.py --write`.')


def test_every_prior_field_is_listed_with_a_comment():
  from experiments import prior_base  # pylint: disable=g-import-not-at-top
  target = config_reference.TARGETS[1]
  fields = config_reference.parse_fields(target.config, target.function)
  assert {f.path for f in fields} == set(_leaf_paths(prior_base.get_prior_config()))
  assert all(f.comment for f in fields), [f.path for f in fields if not f.comment]
