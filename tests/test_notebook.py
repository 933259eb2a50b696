"""Runs notebooks/vq_colab.ipynb end to end in a real kernel (CI mode: tiny VQ-VAE, 6 steps)."""

import json
import os
import pathlib
import re

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'vq_colab.ipynb'
EVAL_KEYS = {'step', 'dataset', 'num_examples', 'psnr', 'ssim', 'mse', 'lpips',
             'codebook_usage', 'perplexity', 'num_codes'}


def _text(cell) -> str:
  """Everything a cell printed: stdout, stderr (the absl log) and text results."""
  parts = []
  for out in cell.get('outputs', []):
    if out['output_type'] == 'stream':
      parts.append(out['text'])
    elif 'data' in out and 'text/plain' in out['data']:
      parts.append(out['data']['text/plain'])
  return ''.join(parts)


def _cell_printing(nb, needle: str):
  cells = [c for c in nb.cells if c.cell_type == 'code' and needle in c.source]
  assert len(cells) == 1, f'expected one code cell containing {needle!r}'
  return cells[0]


@pytest.mark.slow
def test_notebook_runs_end_to_end_in_ci_mode(tmp_path, monkeypatch):
  # The kernel inherits os.environ: CI mode, one CPU device, the offline tfds copy.
  monkeypatch.setenv('VQ_NOTEBOOK_CI', '1')
  monkeypatch.setenv('VQ_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert os.environ.get('TFDS_DATA_DIR'), 'tests/conftest.py sets TFDS_DATA_DIR'
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  # 'python3' is ipykernel's own spec: it runs this interpreter (the venv's python).
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=300,
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()  # raises CellExecutionError naming the cell on any error

  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o['output_type'] == 'error']
  assert not errors

  devices = _text(_cell_printing(nb, 'jax.default_backend()'))
  assert re.search(r'Found CPU: 1 device\(s\) of kind cpu', devices), devices

  first = _text(_cell_printing(nb, 'config.train.num_steps = FIRST_STEPS'))
  # absl log lines reach the notebook: the loop's start line and progress with an ETA.
  assert 'vq: starting at step 0 of 3 (fresh)' in first, first
  assert 'ETA' in first
  assert 'trained to step 3' in first

  resumed = _text(_cell_printing(nb, 'resume_step = ckpt.latest_step()'))
  assert 'latest checkpoint: step 3' in resumed
  assert 'vq: starting at step 3 of 6 (resumed)' in resumed, resumed
  assert 'resumed from step 3; now at step 6' in resumed

  tokens = _text(_cell_printing(nb, 'tok.encode(test_images[:8])'))
  assert 'tokens (8, 8, 8) int32' in tokens, tokens

  plots = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
           if 'image/png' in o.get('data', {})]
  assert len(plots) >= 5  # grid, code histogram, two loss-curve figures, token figure

  results_text = _text(_cell_printing(nb, 'evaluation.evaluate(config, WORKDIR)'))
  results = json.loads(results_text[results_text.index('{'):results_text.rindex('}') + 1])
  assert EVAL_KEYS <= set(results), sorted(results)
  assert results['step'] == 6 and results['num_examples'] == 64
  assert 0 <= results['ssim'] <= 1 and results['psnr'] > 0
  saved = json.loads((tmp_path / 'workdir' / 'eval' / 'step_6.json').read_text())
  assert saved == results

  prior = _text(_cell_printing(nb, 'prior_trainer.train_and_evaluate'))
  assert 'vq: gpt prior over 8x8 tokens' in prior and 'prior trained to step 4' in prior, prior
  assert len(plots) >= 6  # ... and the class grid of samples

  edit = _text(_cell_printing(nb, 'editor.inpaint('))
  assert 'regenerated token rows [4, 5, 6, 7]' in edit, edit
  assert 'known tokens kept: True' in edit, edit
  assert len(plots) >= 7  # ... and the completions of the bottom half
