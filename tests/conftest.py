import os

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before any kernel is
# defined; on a machine with a GPU the real compiler is used.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
