"""benchmarks/peer_mingpt.py without torch: the module loads, the transformers stand-in."""

import pytest

from benchmarks import peer_mingpt


def test_transformers_stand_in_refuses_top_k():
  stand_in = peer_mingpt._transformers_stand_in()
  with pytest.raises(RuntimeError, match='without top-k'):
    stand_in.top_k_top_p_filtering(None, top_k=5)
