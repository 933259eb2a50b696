"""A benchmark peer in a process of its own, stepped over a pipe (no torch imported here).

  proc = peer_process.PeerProcess(peer_sonnet.SonnetPeer, config, images, num_threads=2,
                                  environ=env)
  losses = proc.step()          # proc.call('step'): one method call in the child
  peak_rss_mb = proc.close()

`factory(*args, **kwargs)` runs in the child (multiprocessing 'spawn'; `factory` must be
importable by name, e.g. a class at module level) and must return an object with `step()`,
`num_params()` and `describe()`. Process-wide settings then stay each side's own: the
malloc tunables our benchmark restarts with (vq/cpu/host_memory.py) reach the peer only if
`environ` keeps them, the peer's threads are its own, and the peak RSS of each side is its
own. A call's round trip over the pipe adds well under a millisecond to the steps it times.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from typing import Any, Callable


def peak_rss_mb() -> float:
  """This process's peak RSS. VmHWM, not ru_maxrss: a spawned child's ru_maxrss keeps the
  parent's peak from before the exec."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve(conn, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
  """The child: builds the peer, then answers ('method', args) messages until 'stop'."""
  peer = factory(*args, **kwargs)
  conn.send({'num_params': peer.num_params(), 'describe': peer.describe()})
  while True:
    message = conn.recv()
    if message == 'stop':
      break
    name, call_args = message
    conn.send(getattr(peer, name)(*call_args))
  conn.send(peak_rss_mb())


class PeerProcess:
  """`factory(*args, **kwargs)` built and run in a process of its own.

  Args:
    factory: builds the peer in the child (picklable by name).
    *args, **kwargs: passed to `factory`.
    environ: the child's environment (default: this process's).
  """

  def __init__(self, factory: Callable[..., Any], *args,
               environ: dict[str, str] | None = None, **kwargs):
    ctx = multiprocessing.get_context('spawn')
    self._conn, child_conn = ctx.Pipe()
    self._process = ctx.Process(target=_serve, daemon=True,
                                args=(child_conn, factory, args, kwargs))
    saved = dict(os.environ)
    try:  # a spawned child inherits os.environ as it is at start()
      if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
      self._process.start()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    child_conn.close()
    info = self._recv()
    self._num_params, self._describe = info['num_params'], info['describe']

  def _recv(self):
    try:
      return self._conn.recv()
    except EOFError:
      self._process.join(timeout=10)
      raise RuntimeError(f'the peer process exited (code {self._process.exitcode}); its '
                         'traceback is above on stderr.') from None

  def call(self, name: str, *args) -> Any:
    """`peer.name(*args)` in the child; returns its (picklable) result."""
    self._conn.send((name, args))
    return self._recv()

  def step(self) -> dict[str, float]:
    """One train step in the child; returns its losses."""
    return self.call('step')

  def num_params(self) -> dict[str, int]:
    return self._num_params

  def describe(self) -> dict[str, Any]:
    return self._describe

  def close(self) -> float:
    """Stops the child; returns its peak RSS in MB."""
    self._conn.send('stop')
    rss = self._recv()
    self._process.join(timeout=30)
    return rss
