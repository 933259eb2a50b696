"""The editing modes on a tiny trained tokenizer and priors: inpaint, edit, sample_large,
eval_inpaint, the GPT refusal and bad masks before anything compiles."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import gpt_cifar
from experiments import maskgit_cifar
from experiments import vqvae_cifar
from vq import inference
from vq.generation import cli
from vq.generation import edit_cli
from vq.generation import editing
from vq.generation import generator as gen_lib
from vq.generation import masks as masks_lib
from vq.generation import tokens as token_data
from vq.runtime import loop
from vq.training import trainer as tokenizer_trainer

SEED_IMAGES = 5


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A 2-step tokenizer, an untrained MaskGIT and GPT prior on it, and 5 images as npz."""
  root = tmp_path_factory.mktemp('editing')
  config = vqvae_cifar.get_config('smoke')
  config.train.num_steps, config.train.checkpoint_every, config.train.image_every = 2, 2, 0
  tokenizer_trainer.train_and_evaluate(config, str(root / 'tokenizer'))
  priors = {}
  for kind, module in (('maskgit', maskgit_cifar), ('gpt', gpt_cifar)):
    c = _config(module, root / 'tokenizer')
    _untrained_prior(c, root / kind)
    priors[kind] = (c, str(root / kind))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (SEED_IMAGES, 32, 32, 3)).astype(np.uint8)
  np.savez(root / 'images.npz', images=images, labels=np.array([0, 1, 2, 3, 1]))
  return {'priors': priors, 'images': images, 'dataset': f'npz:{root / "images.npz"}',
          'root': root}


def _untrained_prior(config, workdir):
  """A prior workdir as the trainer leaves it (config.json, a checkpoint naming its
  tokenizer), with initial weights: editing only needs some prior, and this skips
  compiling a training step."""
  workdir.mkdir()
  loop.write_config(config, workdir)
  tok = token_data.load_tokenizer(config.prior.tokenizer_workdir)
  layout = gen_lib.layout_for(config, tok)
  state = gen_lib.create_state(config, gen_lib.build_model(config, layout), layout,
                               jax.random.PRNGKey(0))
  ckpt = gen_lib.checkpointer(workdir / 'checkpoints', keep=1)
  ckpt.save(1, state, meta={'config': json.loads(config.to_json_best_effort()),
                            'objective': config.objective,
                            'tokenizer': token_data.identity(tok, config.prior.tokenizer_workdir)})
  ckpt.wait()
  ckpt.close()


def _config(module, tokenizer_dir):
  c = module.get_config('smoke')
  c.prior.tokenizer_workdir = str(tokenizer_dir)
  c.data.max_examples, c.eval.max_examples = 16, 16
  c.train.batch_size, c.sample.batch_size, c.eval.batch_size = 8, 8, 16
  c.train.image_every, c.eval.num_samples, c.train.num_steps = 0, 16, 1
  c.sample.num_iterations = 3
  return c


def _run(runs, kind, mode, out, **flags):
  config, workdir = runs['priors'][kind]
  return cli.run(config, mode, workdir, out=str(out), dataset=runs['dataset'], **flags)


def test_maskgit_inpaints_keeping_known_tokens_and_pixels(runs, tmp_path):
  result = _run(runs, 'maskgit', 'inpaint', tmp_path, mask='center', samples_per_image=2)
  with np.load(result['completions_npz']) as f:
    images, masks, tokens, regions = f['images'], f['masks'], f['tokens'], f['regions']
  originals = runs['images']
  assert images.shape == (SEED_IMAGES, 2, 32, 32, 3) and masks.shape == (SEED_IMAGES, 32, 32)
  far = np.ones((32, 32), bool)
  far[6:26, 6:26] = False                       # outside the mask and its 2-pixel feather
  for s in range(2):
    np.testing.assert_array_equal(images[:, s][:, far], originals[:, far])
  tok = gen_lib.Generator.from_workdir(runs['priors']['maskgit'][1]).tokenizer
  encoded = tok.encode(masks_lib.telea(originals, masks))   # the masked pixels never read
  assert regions.sum() == SEED_IMAGES * 16                  # cells 2..5, not widened
  for s in range(2):
    np.testing.assert_array_equal(tokens[:, s][:, ~regions[0]], encoded[:, ~regions[0]])
  grid = np.asarray(Image.open(result['inpaint_png']))
  assert grid.shape[0] == 4 * 34 + 2           # originals, masked, 2 samples: 4 lines
  widened = _run(runs, 'maskgit', 'inpaint', tmp_path / 'w', mask='center', widen=1)
  assert widened['widen'] == 1 and widened['token_region_fraction'] == 36 / 64


def test_completions_do_not_depend_on_the_masked_pixels(runs):
  gen = gen_lib.Generator.from_workdir(runs['priors']['maskgit'][1])
  images = runs['images']
  masks = masks_lib.pixel_masks('right', len(images), (32, 32))
  damaged = images.copy()
  damaged[masks] = 255 - damaged[masks]
  # The tokenizer itself sees past its cells: encoding the inputs as they are would differ.
  assert not np.array_equal(gen.tokenizer.encode(images), gen.tokenizer.encode(damaged))
  editor = editing.Editor(gen)
  key = jax.random.PRNGKey(3)
  a = editor.inpaint(images, masks, None, key)
  b = editor.inpaint(damaged, masks, None, key)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_gpt_refuses_non_suffix_masks_before_compiling_and_completes_bottom(
    runs, tmp_path, monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError('the prior or the tokenizer ran before the mask was checked')
  with monkeypatch.context() as m:
    m.setattr(editing, 'complete_tokens', no_compile)
    m.setattr(inference.Tokenizer, 'encode', no_compile)
    for spec in ('right', 'center'):
      with pytest.raises(ValueError, match='raster suffix') as e:
        _run(runs, 'gpt', 'inpaint', tmp_path, mask=spec)
      assert '\n' not in str(e.value)
  result = _run(runs, 'gpt', 'inpaint', tmp_path / 'b', mask='bottom')
  with np.load(result['completions_npz']) as f:
    np.testing.assert_array_equal(f['images'][:, :14], runs['images'][:, :14])   # 16 - 2 feathered
    assert f['regions'][:, :4].sum() == 0 and f['regions'][:, 4:].all()


def test_bad_masks_fail_in_one_line_before_the_prior_loads(runs, tmp_path, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError('the prior was loaded before the mask was checked')
  monkeypatch.setattr(gen_lib.Generator, 'from_workdir', no_load)
  empty = np.zeros((32, 32), np.uint8)
  Image.fromarray(empty).save(tmp_path / 'empty.png')
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / 'all.png')
  Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / 'grey.png')
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / 'small.png')
  for spec, needle in ((f'file:{tmp_path / "empty.png"}', 'is empty'),
                       (f'file:{tmp_path / "all.png"}', 'masks every pixel'),
                       (f'file:{tmp_path / "grey.png"}', 'not binary'),
                       (f'file:{tmp_path / "small.png"}', 'are 8x8 pixels'),
                       (f'file:{tmp_path / "nope.png"}', 'does not exist'),
                       ('box:0,0,33,8', 'leaves the 32x32 image')):
    for mode in ('inpaint', 'eval_inpaint'):
      with pytest.raises(ValueError, match=needle) as e:
        _run(runs, 'maskgit', mode, tmp_path, mask=spec)
      assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='needs --mask'):
    _run(runs, 'maskgit', 'inpaint', tmp_path)
  for mode in ('inpaint', 'eval_inpaint', 'edit'):
    with pytest.raises(ValueError, match='--widen=-1 must be') as e:
      _run(runs, 'maskgit', mode, tmp_path, mask='center', widen=-1, target_label=1)
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='only a MaskGIT prior'):
    _run(runs, 'gpt', 'edit', tmp_path, target_label=1)


def test_edit_writes_a_schedule_and_its_tradeoff(runs, tmp_path):
  result = _run(runs, 'maskgit', 'edit', tmp_path, target_label=1, ratios='0.5,1')
  assert [row['ratio'] for row in result['schedule']] == [0.0, 0.5, 1.0]
  with np.load(result['edits_npz']) as f:
    assert f['images'].shape == (3, 3, 32, 32, 3)     # the two images of class 1 left out
    np.testing.assert_array_equal(f['source_labels'], [0, 2, 3])
  assert all(np.isfinite(row['lpips_to_source']) for row in result['schedule'])
  assert ('classifier_target_accuracy' in result['schedule'][0]) != (
      'classifier_unavailable' in result)
  assert json.loads((tmp_path / 'edit.json').read_text())['target_label'] == 1


def test_larger_than_trained_grids(runs, tmp_path):
  # The GPT's sliding window is the same mode with another sampler (tests/generation/
  # test_editing.py checks both samplers).
  result = _run(runs, 'maskgit', 'sample_large', tmp_path, token_grid='12,10', labels='0,3')
  with np.load(result['large_npz']) as f:
    assert f['images'].shape == (2, 48, 40, 3) and f['tokens'].shape == (2, 12, 10)
  assert np.isfinite(result['fd_vgg_random_crops'])
  assert np.isfinite(result['fd_vgg_ordinary_samples'])
  with pytest.raises(ValueError, match='at least the prior'):
    _run(runs, 'maskgit', 'sample_large', tmp_path, token_grid='4,16')


def test_eval_inpaint_scores_every_method_and_reports_gpt_where_it_applies(runs, tmp_path):
  result = _run(runs, 'gpt', 'eval_inpaint', tmp_path, mask='right,bottom')
  assert result['num_images'] == SEED_IMAGES
  assert 'raster suffix' in result['right']['prior_not_applicable']
  assert 'prior' not in result['right'] and 'prior' in result['bottom']
  for spec in ('right', 'bottom'):
    for method in ('tokenizer_most_frequent', 'opencv_telea', 'reference_reconstruction'):
      scores = result[spec][method]
      assert scores['num_images'] == SEED_IMAGES
      assert all(np.isfinite(scores[k]) for k in ('psnr_masked', 'lpips_masked', 'fd_vgg'))
  written = json.loads(pathlib.Path(result['written']).read_text())
  assert written['bottom']['prior'] == result['bottom']['prior']
  assert (tmp_path / 'inpaint_bottom.png').is_file()
  assert edit_cli.resolve_labels('dataset', np.array([1, 2]), 10).tolist() == [1, 2]
  with pytest.raises(ValueError, match='names 3 classes for 2 images'):
    edit_cli.resolve_labels('1,2,3', np.array([1, 2]), 10)


@pytest.mark.parametrize('flags,needle', [
    (('--mask=box:0,0,40,8',), 'leaves the 32x32'),
    (('--mask=center', '--widen=-1'), '--widen=-1 must be')])
def test_run_py_passes_the_editing_flags(runs, tmp_path, flags, needle):
  config, workdir = runs['priors']['maskgit']
  repo = pathlib.Path(__file__).resolve().parents[2]
  result = subprocess.run(
      [sys.executable, str(repo / 'run.py'), '--config=experiments/maskgit_cifar.py:smoke',
       f'--config.prior.tokenizer_workdir={config.prior.tokenizer_workdir}',
       f'--workdir={workdir}', '--mode=inpaint', f'--dataset={runs["dataset"]}',
       f'--out={tmp_path}', '--samples_per_image=2', '--feather=1', *flags,
       '--cpu_devices=1'],
      cwd=repo, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and needle in lines[0], lines
