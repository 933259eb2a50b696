"""benchmarks/profile_step.py: the op_name categories and the trace/HLO parsing (no profiling)."""

import gzip
import json

import pytest

from benchmarks import profile_step
from benchmarks import xla_trace


@pytest.mark.parametrize('op_name, expected', [
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.decode/decoder/up0_block0/conv1/conv_general_dilated',
     'conv forward'),
    ('jit(_fun)/transpose(jvp(VQTokenizer))/VQTokenizer.decode/decoder/up0_block0/conv1/'
     'transpose(jvp())/conv_general_dilated', 'conv input gradient'),
    ('jit(_fun)/transpose(jvp(VQTokenizer))/VQTokenizer.encode/encoder/down0_block1/conv2/while/'
     'body/closed_call/dot_general', 'conv kernel gradient and im2col'),
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.decode/decoder/up1_upsample/conv/add',
     'conv forward other'),
    # The Sonnet network's layers: transposed convs and residual-stack convs.
    ('jit(_fun)/transpose(jvp(VQTokenizer))/VQTokenizer.decode/decoder/deconv1/ffi_call',
     'conv kernel gradient and im2col'),
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.encode/encoder/res_stack/res1_conv1/dot_general',
     'conv forward other'),
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.decode/decoder/mid_attn/qkv/dot_general', 'attention'),
    ('jit(_fun)/transpose(jvp(VQTokenizer))/VQTokenizer.decode/decoder/up0_block1/norm1/add_any',
     'groupnorm'),
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.encode/encoder/down0_block0/jit(silu)/mul', 'swish'),
    ('jit(_fun)/jvp(LPIPS)/LPIPS._vgg/vgg/conv4_2/dot_general', 'lpips'),
    ('jit(_fun)/jvp(PatchGANDiscriminator)/Conv_1/conv_general_dilated', 'discriminator'),
    ('jit(_fun)/jvp(VQTokenizer)/VQTokenizer.quantize/quantizer/argmin', 'quantizer'),
    ('jit(_fun)/shard_map/psum', 'other'),
    ('', 'other'),
])
def test_category(op_name, expected):
  assert profile_step.category(op_name) == expected


def test_op_names_and_thunk_times(tmp_path):
  hlo = ('  %ynn_fusion.7 = f32[2,2]{1,0} fusion(%p), kind=kCustom, calls=%fc.7, '
         'metadata={op_name="jit(_fun)/a/conv_general_dilated" stack_frame_id=1}\n'
         '  ROOT %copy.3 = f32[2]{0} copy(%x), metadata={op_name="jit(_fun)/b/norm/mul"}\n'
         '  %bitcast.1 = f32[4]{0} bitcast(%y)\n')
  assert xla_trace.op_names(hlo) == {'ynn_fusion.7': 'jit(_fun)/a/conv_general_dilated',
                                        'copy.3': 'jit(_fun)/b/norm/mul'}
  events = [{'ph': 'X', 'name': 'ynn_fusion.7', 'dur': 5.0},
            {'ph': 'X', 'name': 'ynn_fusion.7', 'dur': 7.0},
            {'ph': 'X', 'name': 'while.2', 'dur': 100.0},          # its body is counted instead
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 50.0},
            {'ph': 'M', 'name': 'thread_name', 'args': {'name': 'x'}}]
  trace_dir = tmp_path / 'plugins' / 'profile' / 'run'
  trace_dir.mkdir(parents=True)
  with gzip.open(trace_dir / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  assert xla_trace.thunk_times(str(tmp_path)) == {'ynn_fusion.7': 12.0}
  with pytest.raises(FileNotFoundError, match='no \\*.trace.json.gz'):
    xla_trace.thunk_times(str(tmp_path / 'plugins' / 'profile' / 'none'))


def test_per_op_groups_thunks_by_the_last_part_of_their_op_name_per_call():
  per_thunk = {'ynn_fusion.1': 3000.0, 'ynn_fusion.2': 1000.0, 'fusion.7': 600.0,
               'copy.3': 400.0}                                   # microseconds over 2 calls
  names = {'ynn_fusion.1': 'jit(f)/while/body/block0/fc/dot_general',
           'ynn_fusion.2': 'jit(f)/while/body/block1/proj/dot_general',
           'fusion.7': 'jit(f)/while/body/block0/attn/dynamic_update_slice'}
  by_op, by_thunk, total = xla_trace.per_op(per_thunk, names, traced=2)
  assert by_op == {'dot_general': 2.0, 'dynamic_update_slice': 0.3, 'copy.3': 0.2}
  assert by_thunk.most_common(1) == [('ynn_fusion.1', 1.5)]
  assert total == 2.5
