"""`python tools/op_marks.py ARGS...`: the rshard CLI (ARGS as after `python -m rshard_hpc`) with trace marks around
the GPU path's operations, so that `rshard bench trace` shows each launch's host time inside a layer (set
RSHARD_TRACE=DIR; without it the marks are not recorded). Each wrapped call marks "NAME" on entry and "NAME." on
return. For finding a layer's fixed cost at 13 ranks on one GPU (issue 13); not part of the package."""
import sys


def _wrap(owner, name: str, label: str) -> None:
    from rshard_hpc.engine import trace

    inner = getattr(owner, name)

    def marked(*args, **kwargs):
        trace.mark(label)
        try:
            return inner(*args, **kwargs)
        finally:
            trace.mark(label + ".")

    setattr(owner, name, marked)


def install() -> None:
    from rshard_hpc.ops import attention_cuda, decode_cuda, passes_cuda, precision

    for name in ("rms_norm", "rope_qk", "pack", "silu_mul", "unpack_merge"):
        _wrap(passes_cuda, name, name)
    _wrap(precision, "_gemm_t", "gemm")
    _wrap(precision, "_gpu_to_bits", "to_bf16")
    _wrap(attention_cuda.CudaAttentionPlan, "__call__", "attend")
    _wrap(decode_cuda.PlanLayers, "layer", "an_layer")


if __name__ == "__main__":
    install()
    from rshard_hpc.cli import main

    sys.argv[0] = "rshard"
    main()
