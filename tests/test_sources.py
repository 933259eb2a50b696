"""Checks on the test sources themselves."""

import ast
import pathlib

import pytest

_TESTS = pathlib.Path(__file__).resolve().parent


def _is_main_guard(node: ast.stmt) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__')


@pytest.mark.parametrize('path', sorted(_TESTS.rglob('*.py')),
                         ids=lambda p: str(p.relative_to(_TESTS)))
def test_a_main_block_is_the_last_statement(path):
  # `if __name__ == '__main__': absltest.main()` runs when the module is executed: anything
  # defined after it would be missing from a direct run (and is dead weight under pytest).
  body = ast.parse(path.read_text(), filename=str(path)).body
  guards = [i for i, node in enumerate(body) if _is_main_guard(node)]
  assert all(i == len(body) - 1 for i in guards), (
      f'{path.name}: an `if __name__ == ...` block at statement {guards[0] + 1} of '
      f'{len(body)}; move it to the end of the module or remove it.')
