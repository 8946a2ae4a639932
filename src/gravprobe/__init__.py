"""gravprobe: does Newton's law of gravitation emerge in a transformer pretrained on orbits?

Sub-packages (each usable on its own):
- ``gravprobe.orbits``    simulator, priors, tokenizer, sharded trajectory datasets (numpy only)
- ``gravprobe.attention`` every attention variant in plain PyTorch and the ``attend`` dispatch
- ``gravprobe.kernels``   fused Triton kernels (imported only when Triton is usable)
- ``gravprobe.pretrain``  the GPT, text corpora, mixed training, length extrapolation
- ``gravprobe.probes``    linear probes, force head, oracle, symbolic regression, Newton verdict
"""
__version__ = "0.1.0"
