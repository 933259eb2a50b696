"""One process of tests/test_multiprocess.py: trains the smoke VQ-VAE, saves its params.

  python tests/multiprocess_worker.py --workdir=W --out=P.npz --num_processes=2 \
      --process_id=0 --coordinator_address=localhost:PORT --phases=pmap:3,jit:4 \
      --eval_every=4

Each phase `KIND:STEPS` calls `trainer.train_and_evaluate` with train.parallel=KIND and
train.num_steps=STEPS in the same workdir, so a later phase resumes from the checkpoint
the earlier one wrote. The state every process hands to the checkpointer (its own host
copy) is captured and written to `OUT` as `step<N>/<path>` arrays, so the test can
compare processes with each other and with a single-process run; with --eval_every, the
last phase's test-split metrics (48 examples) go there too as `final_eval/<name>`. The environment
(XLA_FLAGS, JAX_PLATFORMS, TFDS_DATA_DIR) is set by the test.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from vq.runtime import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--coordinator_address', default=None)
  parser.add_argument('--phases', default='pmap:3')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--eval_every', type=int, default=0)
  args = parser.parse_args()

  # Before JAX touches a device, as run.py does.
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import vqvae_cifar  # pylint: disable=g-import-not-at-top
  from vq.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from vq.runtime import state as ts  # pylint: disable=g-import-not-at-top
  from vq.training import trainer  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == args.num_processes, jax.process_count()
  captured = {}
  original_save = checkpointing.Checkpointer.save

  def capturing_save(self, step, state, meta=None, *, force=False):
    captured[int(step)] = flax.traverse_util.flatten_dict(
        jax.device_get(ts.checkpointable(state)), sep='/')
    return original_save(self, step, state, meta, force=force)

  checkpointing.Checkpointer.save = capturing_save
  for phase in args.phases.split(','):
    kind, steps = phase.split(':')
    config = vqvae_cifar.get_config('smoke')
    config.update_from_flattened_dict({
        'train.parallel': kind, 'train.num_steps': int(steps),
        'train.batch_size': args.batch_size, 'train.log_every': 1,
        'train.checkpoint_every': 3, 'train.image_every': 0, 'data.prefetch': 1,
        'train.eval_every': args.eval_every, 'eval.batch_size': 16, 'eval.max_examples': 48,
        'eval.lpips': False, 'eval.rfid': False})
    final = trainer.train_and_evaluate(config, args.workdir)
  arrays = {f'step{step}/{path}': np.asarray(v)
            for step, flat in captured.items() for path, v in flat.items()}
  # The last phase's test-split evaluation, as this process computed it.
  arrays.update({f'final_{k}': np.asarray(v) for k, v in final.items()
                 if k.startswith('eval/')})
  np.savez(args.out, **arrays)
  print(f'worker {jax.process_index()}/{jax.process_count()}: saved steps '
        f'{sorted(captured)} to {args.out}', flush=True)


if __name__ == '__main__':
  main()
