"""Compile every kernel specialisation ahead of time for an NVIDIA architecture — no GPU needed.

Triton's interpreter (how the tests run on a CPU) accepts code the GPU compiler rejects (non-constexpr
globals, mixed dot dtypes, dot tiles under 16, …). This runs the real compiler — Triton IR → PTX →
cubin with the ptxas bundled in the Triton wheel — for the launch configurations ``ops.py`` uses, and
reports shared-memory use, so such errors surface on a machine without a GPU::

    python -m gravprobe.kernels.compile_check --arch 90            # H100; 80 = A100
    python -m gravprobe.kernels.compile_check --arch 80 --quick    # bf16, D=64 only

It must run with ``TRITON_INTERPRET`` unset (it removes it from its own environment before Triton is
imported; run it as its own process, as ``tests/test_kernels_compile.py`` does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

from gravprobe.kernels import SUPPORTED_VARIANTS  # noqa: E402 - the package imports no Triton

_INT_ARGS = ("H", "T", "HEAD_DIM")
_FLOAT_ARGS = ("scale", "log_coef", "power", "offset")
_FP32_POINTERS = ("STAT_", "QS", "KS", "DQS", "DKS")


def _signature(fn, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in _INT_ARGS:
            sig[name] = "i32"
        elif name in consts:
            sig[name] = "constexpr"
        elif name.startswith(_FP32_POINTERS):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:  # strides, offset_until
            sig[name] = "i32"
    return sig


def specs(quick: bool, variants=SUPPORTED_VARIANTS):
    """(kernel name, variant, dtype, head dim) combinations, with the block sizes ops.py would pick."""
    dtypes = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    dims = (64,) if quick else (40, 64, 128)
    for kernel in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"):
        for variant in variants:
            for dtype in dtypes:
                for d in dims:
                    yield kernel, variant, dtype, d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (80 = A100, 90 = H100)")
    parser.add_argument("--quick", action="store_true", help="bf16 and head dim 64 only")
    parser.add_argument("--variants", nargs="+", default=list(SUPPORTED_VARIANTS), choices=SUPPORTED_VARIANTS)
    args = parser.parse_args(argv)

    import triton
    from gravprobe.kernels import ops
    from gravprobe.kernels import triton_attention as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, variant, dtype, d in specs(args.quick, tuple(args.variants)):
        fn = getattr(kernels, name)
        cfg = ops._config(d, backward=name != "_fwd_kernel")
        scalars = ops._scalars(variant, d, **ops.PARAM_DEFAULTS)    # the registry's defaults
        consts = {"CAUSAL": True, "LENGTH_SCALE": scalars["LENGTH_SCALE"], "LSSAR": scalars["LSSAR"],
                      "NORM": variant != "softplus", "POWER_INT": scalars["POWER_INT"], "BLOCK_M": cfg.block_m,
                      "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "UPCAST": False,
                      "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        t0 = time.time()
        try:
            compiled = triton.compile(ASTSource(fn, _signature(fn, dtype, consts), constexprs=consts),
                                      target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            print(f"ok   sm_{args.arch} {name:16s} {variant:8s} {dtype} D={d:<3d} "
                  f"blocks {cfg.block_m}x{cfg.block_n}x{cfg.block_d} shared {compiled.metadata.shared} B "
                  f"({time.time() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failing specialisation, then fail
            failures += 1
            print(f"FAIL sm_{args.arch} {name} {variant} {dtype} D={d}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
