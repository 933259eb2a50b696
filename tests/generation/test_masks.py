"""Mask specs, the token region of a pixel mask (hand-computed cases), the GPT refusal and
the feathered blend."""

import numpy as np
import pytest
from PIL import Image

from vq.generation import masks as masks_lib


def _grid(shape, rows, cols):
  """bool grid with the block rows x cols (inclusive ranges) set, written out by hand."""
  g = np.zeros(shape, bool)
  g[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
  return g


# (spec, image side, token grid, expected region as (rows, cols) inclusive), worked out by
# hand: cell = pixel // f, then one token more on every side (widen=1), clipped to the grid.
CASES = [
    # 8x8 CIFAR grid, f = 4.
    ('center', 32, 8, ((1, 6), (1, 6))),          # pixels 8..23 -> cells 2..5
    ('bottom', 32, 8, ((3, 7), (0, 7))),          # rows 16..31 -> cell rows 4..7
    ('right', 32, 8, ((0, 7), (3, 7))),           # cols 16..31 -> cell cols 4..7
    ('top', 32, 8, ((0, 4), (0, 7))),             # rows 0..15 -> cell rows 0..3
    ('box:0,0,1,1', 32, 8, ((0, 1), (0, 1))),     # pixel (0, 0) -> cell (0, 0)
    ('box:13,6,14,7', 32, 8, ((0, 2), (2, 4))),   # x=13 -> col 3, y=6 -> row 1
    ('box:3,3,5,5', 32, 8, ((0, 2), (0, 2))),     # pixels 3..4 straddle cells 0 and 1
    ('box:31,31,32,32', 32, 8, ((6, 7), (6, 7))),  # last pixel -> cell 7, clipped
    # 16x16 grids: 64x64 pixels (f = 4) and 32x32 pixels (f = 2).
    ('box:20,36,28,40', 64, 16, ((8, 10), (4, 7))),  # cols 20..27 -> 5..6, rows 36..39 -> 9
    ('center', 64, 16, ((3, 12), (3, 12))),       # pixels 16..47 -> cells 4..11
    ('center', 32, 16, ((3, 12), (3, 12))),       # pixels 8..23, f=2 -> cells 4..11
    ('box:0,30,2,32', 32, 16, ((14, 15), (0, 1))),  # rows 30..31 -> cell 15, cols -> 0
]


@pytest.mark.parametrize('spec,side,grid,expected', CASES)
def test_token_region_matches_hand_computed_cases(spec, side, grid, expected):
  masks = masks_lib.pixel_masks(spec, 2, (side, side))
  region = masks_lib.token_region(masks, (grid, grid), widen=1)
  want = _grid((grid, grid), *expected)
  np.testing.assert_array_equal(region[0], want)
  np.testing.assert_array_equal(region[1], want)


# The same by hand without widening (the default): the cells the mask touches.
CASES_UNWIDENED = [
    ('center', 32, 8, ((2, 5), (2, 5))),          # pixels 8..23 -> cells 2..5
    ('bottom', 32, 8, ((4, 7), (0, 7))),
    ('right', 32, 8, ((0, 7), (4, 7))),
    ('box:13,6,14,7', 32, 8, ((1, 1), (3, 3))),
    ('box:3,3,5,5', 32, 8, ((0, 1), (0, 1))),     # straddles cells 0 and 1
    ('center', 64, 16, ((4, 11), (4, 11))),       # pixels 16..47 -> cells 4..11
    ('box:0,30,2,32', 32, 16, ((15, 15), (0, 0))),  # f=2: rows 30..31 -> 15, cols -> 0
]


@pytest.mark.parametrize('spec,side,grid,expected', CASES_UNWIDENED)
def test_token_region_by_default_is_the_cells_touched(spec, side, grid, expected):
  masks = masks_lib.pixel_masks(spec, 1, (side, side))
  np.testing.assert_array_equal(masks_lib.token_region(masks, (grid, grid))[0],
                                _grid((grid, grid), *expected))
  assert masks_lib.DEFAULT_WIDEN == 0


@pytest.mark.parametrize('widen', [-1, 0.5, True, '1', None, float('inf')])
def test_bad_widen_is_one_line(widen):
  with pytest.raises(ValueError, match='--widen=.* must be a whole number') as e:
    masks_lib.token_region(np.ones((1, 32, 32), bool), (8, 8), widen=widen)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('feather', [-1, 0.5, True])
def test_bad_feather_is_one_line(feather):
  with pytest.raises(ValueError, match='--feather=.* must be >= 0') as e:
    masks_lib.blend(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8),
                    np.ones((1, 4, 4), bool), feather)
  assert '\n' not in str(e.value)


def test_widening_past_the_grid_covers_it_without_looping_that_often():
  masks = masks_lib.pixel_masks('box:0,0,1,1', 1, (32, 32))
  assert masks_lib.token_region(masks, (8, 8), widen=np.int64(2) ** 60).all()
  assert masks_lib.token_region(masks, (8, 8), widen=np.int64(3)).sum() == 16


def test_telea_fill_reads_no_masked_pixel_and_keeps_the_rest():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  masks = masks_lib.pixel_masks('center', 2, (32, 32))
  other = images.copy()
  other[masks] = rng.integers(0, 256, (int(masks.sum()), 3))
  filled = masks_lib.telea(images, masks)
  np.testing.assert_array_equal(filled, masks_lib.telea(other, masks))
  np.testing.assert_array_equal(filled[~masks], images[~masks])
  assert not np.array_equal(filled[masks], images[masks])


def test_named_masks_cover_the_documented_pixels():
  m = masks_lib.pixel_masks('center', 1, (32, 32))[0]
  assert m.sum() == 16 * 16 and m[8, 8] and m[23, 23] and not m[7, 8] and not m[24, 8]
  r = masks_lib.pixel_masks('right', 1, (32, 32))[0]
  assert r[:, 16:].all() and not r[:, :16].any()
  b = masks_lib.pixel_masks('box:2,5,4,9', 1, (32, 32))[0]
  assert b.sum() == 2 * 4 and b[5, 2] and b[8, 3] and not b[9, 3] and not b[5, 4]


def test_gpt_completes_only_raster_suffixes_and_says_so_in_one_line():
  grid = (8, 8)
  for spec in ('bottom', 'box:0,28,32,32'):
    region = masks_lib.token_region(masks_lib.pixel_masks(spec, 1, (32, 32)), grid)
    assert masks_lib.is_raster_suffix(region).all()
    masks_lib.check_completable('gpt', region, spec)
  for spec in ('right', 'center', 'top', 'left', 'box:0,28,16,32'):
    region = masks_lib.token_region(masks_lib.pixel_masks(spec, 1, (32, 32)), grid)
    assert not masks_lib.is_raster_suffix(region).any()
    masks_lib.check_completable('maskgit', region, spec)
    with pytest.raises(ValueError, match='raster suffix') as e:
      masks_lib.check_completable('gpt', region, spec)
    assert '\n' not in str(e.value) and f'--mask={spec}' in str(e.value)


def test_suffix_test_on_hand_written_grids():
  suffix = np.zeros((1, 3, 3), bool)
  suffix[0, 1, 2] = suffix[0, 2] = True        # tokens 5..8
  gap = suffix.copy()
  gap[0, 2, 0] = False                          # token 6 known after 5 regenerated
  assert masks_lib.is_raster_suffix(suffix)[0] and not masks_lib.is_raster_suffix(gap)[0]


def test_feathered_blend_keeps_pixels_outside_the_border_exactly():
  rng = np.random.default_rng(0)
  original = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  generated = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  masks = masks_lib.pixel_masks('center', 3, (32, 32))
  out = masks_lib.blend(original, generated, masks, feather=2)
  inside = np.zeros((32, 32), bool)
  inside[8:24, 8:24] = True
  border = np.zeros((32, 32), bool)
  border[6:26, 6:26] = True                     # the mask grown by 2 pixels
  np.testing.assert_array_equal(out[:, ~border], original[:, ~border])
  np.testing.assert_array_equal(out[:, inside], generated[:, inside])
  # Distance 1 (row 7) takes 2/3 of the completion, distance 2 (row 6) 1/3.
  o, g = original.astype(np.float64), generated.astype(np.float64)
  np.testing.assert_array_equal(out[:, 7, 10], np.round((2 * g[:, 7, 10] + o[:, 7, 10]) / 3))
  np.testing.assert_array_equal(out[:, 6, 6], np.round((g[:, 6, 6] + 2 * o[:, 6, 6]) / 3))
  np.testing.assert_array_equal(masks_lib.blend(original, generated, masks, 0)[:, ~inside],
                                original[:, ~inside])


def _png(path, array):
  Image.fromarray(array).save(path)
  return f'file:{path}'


def test_file_and_npz_masks(tmp_path):
  m = np.zeros((32, 32), np.uint8)
  m[4:8, 0:32] = 255
  got = masks_lib.pixel_masks(_png(tmp_path / 'm.png', m), 2, (32, 32))
  assert got.shape == (2, 32, 32) and got[1].sum() == 4 * 32 and got[0, 4, 0]
  rgb = np.repeat(m[..., None], 3, axis=-1)
  np.testing.assert_array_equal(masks_lib.pixel_masks(_png(tmp_path / 'c.png', rgb), 1,
                                                       (32, 32))[0], m == 255)
  per_image = np.zeros((2, 32, 32), bool)
  per_image[0, :2] = True
  per_image[1, :, -3:] = True
  np.savez(tmp_path / 'm.npz', masks=per_image)
  np.testing.assert_array_equal(masks_lib.pixel_masks(f'npz:{tmp_path / "m.npz"}', 2, (32, 32)),
                                per_image)


def _bad_cases(tmp_path):
  empty = np.zeros((32, 32), np.uint8)
  full = np.full((32, 32), 255, np.uint8)
  soft = empty.copy()
  soft[10:20, 10:20] = 255
  soft[9, 10:20] = 128
  small = np.zeros((16, 16), np.uint8)
  small[:4] = 255
  colour = np.zeros((32, 32, 3), np.uint8)
  colour[:4, :, 0] = 255
  two = np.zeros((2, 32, 32), bool)
  two[:, :3] = True
  np.savez(tmp_path / 'two.npz', masks=two)
  one_empty = two.copy()
  one_empty[1] = False
  np.savez(tmp_path / 'one_empty.npz', masks=one_empty)
  return [
      (_png(tmp_path / 'small.png', small), 'are 16x16 pixels but the images are 32x32'),
      (_png(tmp_path / 'empty.png', empty), 'is empty'),
      (_png(tmp_path / 'full.png', full), 'masks every pixel'),
      ('box:0,0,32,32', 'masks every pixel'),
      (_png(tmp_path / 'soft.png', soft), 'not binary'),
      (_png(tmp_path / 'colour.png', colour), 'colour'),
      (f'file:{tmp_path / "missing.png"}', 'does not exist'),
      (f'npz:{tmp_path / "missing.npz"}', 'does not exist'),
      (f'npz:{tmp_path / "two.npz"}', 'holds 2 masks for 3 images'),
      (f'npz:{tmp_path / "one_empty.npz"}', 'mask 1 of'),
      ('box:8,8,40,24', 'leaves the 32x32 image'),
      ('box:8,8,24', 'four integers'),
      ('middle', 'not a mask spec'),
  ]


def test_bad_masks_give_one_line_errors(tmp_path):
  for spec, needle in _bad_cases(tmp_path):
    n = 3 if 'two.npz' in spec else 2
    with pytest.raises(ValueError, match=needle) as e:
      masks_lib.pixel_masks(spec, n, (32, 32))
    assert '\n' not in str(e.value), spec


def test_split_specs_keeps_boxes_whole():
  assert masks_lib.split_specs('center,box:0,0,8,8,right') == ['center', 'box:0,0,8,8', 'right']
