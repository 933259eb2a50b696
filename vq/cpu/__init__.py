"""CPU: what exists only to make XLA:CPU fast; none of it runs on GPU or TPU.

- `native`: C++ (AVX-512) XLA FFI kernels for the convolution kernel gradient and
  GroupNorm(+swish), compiled on first use into a per-machine cache; XLA paths wherever
  they cannot run (`kernels/` holds the sources).
- `devices`: how many XLA devices a single-process CPU run shows.
- `host_memory`: huge pages for XLA:CPU's per-step scratch buffer (a process restart that
  only `run.py` asks for).

Importing this package starts nothing: no compiler, no JAX backend, no restart.

Imports: nothing from vq.
"""
