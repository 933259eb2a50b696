"""Core: the base layer every other package may use.

- `metrics`: PSNR, SSIM, MSE on uint8 pixels; codebook perplexity and usage.
- `images`: image grids, histogram pictures, atomic PNG writing.
- `weights`: flat weight trees and npz files that are never unpickled.
- `files`: atomic file writing (a temporary file, then `os.replace`; readable by all).

Imports: nothing from vq.
"""
