"""Runtime: what every program (training, evaluation, inference, generation) runs on.

- `state`: `TrainState` (generator and discriminator params, optimizer states, codebook
  statistics, EMA weights) and how it is created and restored.
- `checkpointing`: orbax `CheckpointManager`: restore-or-init, keep-N, atomic saves.
- `parallel`: the only module that knows `jax.pmap` or `jax.jit` + `shard_map`.
- `distributed`: joining the processes of a multi-host job before JAX starts.
- `writers`: TensorBoard and `metrics.jsonl`.

Imports: `vq.core`, `vq.quantizers`, `vq.models`, `vq.config`.
"""
