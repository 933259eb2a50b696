"""CPU: what exists only to make XLA:CPU fast; none of it runs on GPU or TPU.

- `fast_paths`: the one switch. `VQ_CPU_FAST_PATHS=0` (run.py: `--nocpu_fast_paths`)
  turns off every path below at once (native kernels, native GroupNorm, the im2col/mixed
  routing of `vq.models.conv`'s impl='auto', the several-devices default, the huge-page
  restart), so that the CPU runs the plain XLA program a GPU or TPU runs, on one device
  with XLA's own threads. Also where JAX will run, decided before JAX starts.
- `native`: C++ (AVX-512) XLA FFI kernels for the convolution kernel gradient and
  GroupNorm(+swish), compiled on first use into a per-machine cache, on x86-64 CPUs with
  AVX-512 only; XLA paths wherever they cannot run (`kernels/` holds the sources).
  `VQ_NATIVE=0` turns off only these; `VQ_NATIVE=1` retries a build that failed before.
- `devices`: the CPU plan of a single-process run: how many XLA devices, XLA's intra-op
  threads, whether the single-threaded native kernels run (by cores per device), and
  XLA's in-process collective timeouts.
- `host_memory`: huge pages for XLA:CPU's per-step scratch buffer (a process restart that
  only `run.py` training and the benchmarks ask for, only where JAX runs on the CPU).

Importing this package starts nothing: no compiler, no JAX backend, no restart.

Imports: nothing from vq.
"""
