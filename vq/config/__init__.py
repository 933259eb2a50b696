"""Config: from a config file's fields to modules, optimizers and early, one-line errors.

- `loading`: `load_config('experiments/vqvae_cifar.py:smoke', overrides)`, as `run.py` does.
- `validation`: every config rule, checked before anything compiles (`ConfigError`).
- `builders`: the only place that turns config fields into modules and optimizers.

Imports: `vq.core`, `vq.data`, `vq.quantizers`, `vq.models`.
"""
