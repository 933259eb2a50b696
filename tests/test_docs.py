"""The README and docs/ stay navigable: every relative link and image resolves inside the repo.

Also keeps the README a guide (at most 400 lines): measurement detail belongs in docs/.
"""

import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / 'README.md', REPO / 'notebooks' / 'README.md',
                *(REPO / 'docs').glob('*.md')])
README_MAX_LINES = 400

_FENCE = re.compile(r'^```.*?^```', re.M | re.S)
_CODE_SPAN = re.compile(r'`[^`\n]*`')
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
_LINK = re.compile(r'!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')


def _prose(text: str) -> str:
  """Markdown without fenced code blocks and code spans, where brackets are not links."""
  return _CODE_SPAN.sub('', _FENCE.sub('', text))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r'[`*_]', '', heading.strip().lower())
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def _anchors(text: str) -> set[str]:
  anchors, seen = set(), {}
  for heading in re.findall(r'^#{1,6}\s+(.+?)\s*#*$', _FENCE.sub('', text), re.M):
    slug = _slug(heading)
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f'{slug}-{count}')
  return anchors


def _links(page: pathlib.Path) -> list[str]:
  return [t for t in _LINK.findall(_prose(page.read_text(encoding='utf-8')))
          if not re.match(r'^[a-z][a-z0-9+.-]*:', t)]  # http:, https:, mailto: ...


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_images_resolve_inside_the_repository(page):
  broken = []
  for target in _links(page):
    path_part, _, anchor = target.partition('#')
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.is_relative_to(REPO):
      broken.append(f'{target} (outside the repository)')
    elif not dest.exists():
      broken.append(f'{target} (no such file)')
    elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest.read_text('utf-8')):
      broken.append(f'{target} (no heading with anchor #{anchor} in {dest.name})')
  assert not broken, f'{page.relative_to(REPO)}: broken links: {broken}'


def test_pages_exist_and_link_to_each_other():
  readme_links = set(_links(REPO / 'README.md'))
  for name in ('docs/results.md', 'docs/speed.md', 'docs/accelerator.md'):
    assert (REPO / name).is_file(), name
    assert name in readme_links, f'README.md does not link to {name}'


def test_readme_stays_a_guide():
  lines = (REPO / 'README.md').read_text(encoding='utf-8').count('\n')
  assert lines <= README_MAX_LINES, (
      f'README.md has {lines} lines (limit {README_MAX_LINES}); move detail to docs/.')


def test_link_checker_finds_broken_links(tmp_path, monkeypatch):
  # The checker itself must be able to fail: a missing file, a missing anchor, a path
  # outside the repository; links in code are not links.
  page = tmp_path / 'page.md'
  page.write_text('# Title here\n[ok](#title-here) [bad](#nope) [gone](missing.png)\n'
                  '[out](../../elsewhere.md) `[code](missing.md)`\n'
                  '```\n[fenced](missing.md)\n```\n', encoding='utf-8')
  monkeypatch.setattr(sys.modules[__name__], 'REPO', tmp_path)
  with pytest.raises(AssertionError) as info:
    test_relative_links_and_images_resolve_inside_the_repository(page)
  message = str(info.value)
  assert '#nope' in message and 'missing.png' in message and 'outside' in message
  assert 'missing.md' not in message  # the code span's and the fenced block's
  assert _anchors('# A `b` c: d, 1,000\n## A `b` c: d, 1,000\n') == {'a-b-c-d-1000',
                                                                    'a-b-c-d-1000-1'}
