"""Pretrained tokenizers from PyTorch: taming-transformers VQGAN and LlamaGen VQ checkpoints.

  python -m vq.convert taming --checkpoint=/tmp/last.ckpt --config=/tmp/model.yaml \
      --workdir=/tmp/vqgan_f16
  python -m vq.convert llamagen --checkpoint=/tmp/vq_ds16_c2i.pt --workdir=/tmp/llamagen_f16

The result is an ordinary vq workdir (see `workdir`), so evaluation, reconstruction,
encoding, decoding, fine-tuning and token priors use it unchanged, and the converted model
computes the source's function: the same tokens, reconstructions within float32 rounding
(tests/convert check both against outputs recorded from the PyTorch code).

Modules, each for one concern:
- `torch_reader`: reads torch checkpoint files without torch and without running code.
- `layout`: the tokenizer's tensors named both ways, strict key and shape checks.
- `taming`, `llamagen`: one per source format (config, names, what differs from vq).
- `workdir`: the converted config and the checkpoint written as a vq workdir.
"""
