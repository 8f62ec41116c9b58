"""The CUDA sources (kernels/) compile for sm_90 in every form the host can build, without a GPU.

The program texts come from the host code itself (cuda_build.kernel_source with the defines of
attention_cuda.choose_kernel), so what compiles here is what CuPy compiles on the GPU machine. Compiled
with every NVRTC found, through ctypes (pip install nvidia-cuda-nvrtc-cu12 and / or nvidia-cuda-nvrtc for
CUDA 13, what CuPy 13x uses); skipped where none is found.
Host-side checks that need no compiler (kernel choice, head-dim limits, shared-memory layout) always run.
"""
import ctypes
import ctypes.util
import glob
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from rshard_hpc.dist import device_copy, ipc_signal
from rshard_hpc.ops import attention_cuda as ag
from rshard_hpc.ops import cuda_build, decode_cuda, passes_cuda, small_rows_cuda

ARCH = "sm_90"
SMEM_OPTIN_SM90 = 227 * 1024  # the largest dynamic shared memory a block may ask for on sm_90


# ---------------------------------------------------------------------------------------------- host side
def test_head_dim_limits_and_kernel_choice():
    assert ag.choose_kernel(ag.MAX_HEAD_DIM, True).name == "attn_fwd_mma"
    assert ag.choose_kernel(ag.MAX_HEAD_DIM, False).name == "attn_fwd_simt"
    for bad in (0, ag.MAX_HEAD_DIM + 1, ag.MAX_HEAD_DIM + 16, 65, 130):
        for bf16 in (False, True):
            with pytest.raises(ValueError, match="head dimension"):
                ag.choose_kernel(bad, bf16)
    assert ag.choose_kernel(80, True).name == "attn_fwd_mma" and ag.choose_kernel(40, True).name == "attn_fwd_simt"
    # a configuration given to the plan replaces the default
    assert ag.choose_kernel(64, True, (2, 1, 4, 64, 3, 1)).cfg == ag.MmaConfig(2, 1, 4, 64, 3, 1)


def test_every_mma_configuration_fits_shared_memory():
    """The host's layout (the same numbers it passes to the kernel) fits an sm_90 block, for the defaults and
    every configuration the benchmark may choose."""
    from rshard_hpc.bench import kernel as bench

    kernels = [ag.choose_kernel(d, True) for d in ag.class_ends(True)]
    kernels += [ag.MmaKernel(d, ag.MmaConfig(*c)) for d, cs in bench.VARIANTS.items() for c in cs]
    for k in kernels:
        if isinstance(k, ag.MmaKernel):
            layout = k.smem_layout()
            assert layout["SMEM_BYTES"] == k.smem_bytes <= SMEM_OPTIN_SM90, (k, layout)
            assert all(v % 16 == 0 for n, v in layout.items() if n != "SMEM_ROW"), layout


def test_sources_define_nothing_the_host_passes():
    """No silent defaults: every name the host defines is refused (#error) by the source when missing, and
    never #defined there."""
    names = set()
    for bf16 in (False, True):
        names |= {n for d in ag.class_ends(bf16) for n in ag.choose_kernel(d, bf16).defines()}
    text = "".join((cuda_build.kernel_dir() / f).read_text() for f in ("partial_attention.cu", cuda_build.COMMON_HEADER))
    for source, defined in ((passes_cuda.SOURCE, passes_cuda.defines()), (decode_cuda.SOURCE, decode_cuda.defines(64, 0)),
                            (small_rows_cuda.SOURCE, small_rows_cuda.defines()),
                            (ipc_signal.SOURCE, ipc_signal.defines())):
        source_text = (cuda_build.kernel_dir() / source).read_text()
        for name in defined:
            assert not re.search(rf"#\s*define\s+{name}\b", source_text), name
            assert f'#error "{name} must be defined by the host' in source_text, name
    for name in names:
        assert not re.search(rf"#\s*define\s+{name}\b", text), name
        assert f'#error "{name} must be defined by the host' in text, name


# ---------------------------------------------------------------------------------------------- NVRTC
def _find_nvrtcs() -> dict:
    """{CUDA version: libnvrtc} for each NVRTC found: the nvidia-cuda-nvrtc wheels (CUDA 12 and 13 layouts),
    CUDA_PATH / CUDA_HOME, the loader's path."""
    patterns = [os.path.join(p, "nvidia", sub, "lib", "libnvrtc.so*")
                for p in sys.path for sub in ("cuda_nvrtc", "cu*")]
    patterns += [os.path.join(os.environ.get(v, "/usr/local/cuda"), "lib64", "libnvrtc.so*")
                 for v in ("CUDA_PATH", "CUDA_HOME")]
    paths = sorted({f for p in patterns for f in glob.glob(p) if "alt" not in os.path.basename(f)})
    found = ctypes.util.find_library("nvrtc")
    libs = {}
    for path in paths + ([found] if found else []):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        libs.setdefault(f"{major.value}.{minor.value}", lib)
    return libs


NVRTCS = _find_nvrtcs()
needs_nvrtc = pytest.mark.skipif(not NVRTCS, reason="no NVRTC library (pip install nvidia-cuda-nvrtc-cu12)")


def nvrtc_compile(lib, code: str, options) -> tuple:
    """(ok, log) of compiling `code` to a cubin with NVRTC library `lib`."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"kernel.cu", 0, None, None) == 0
    try:
        opts = [o.encode() for o in options]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return status == 0, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _cases():
    """(id, source, defines) of every program the host builds: both attention kernels at the ends of every
    head-dim class of both dtypes, every benchmark configuration of the tensor-core kernel, the order, merge,
    passes, small-row, decode and range-copy kernels."""
    from rshard_hpc.bench import kernel as bench

    kernels = [ag.choose_kernel(d, bf16) for bf16 in (False, True) for d in ag.class_ends(bf16)]
    kernels += [ag.MmaKernel(d, ag.MmaConfig(*c)) for d, cs in bench.VARIANTS.items() for c in cs]
    cases = {}
    for k in kernels:
        tag = f"mma-D{k.head_dim}-{'.'.join(map(str, k.cfg))}" if isinstance(k, ag.MmaKernel) else \
            f"simt-{'bf16' if k.bf16 else 'fp32'}-D{k.head_dim}"
        cases[tag] = (k.source, k.defines())
    cases["order"] = ("attention_order.cu", {})
    cases["merge"] = ("merge.cu", {})
    cases["passes"] = (passes_cuda.SOURCE, passes_cuda.defines())
    cases["small-rows"] = (small_rows_cuda.SOURCE, small_rows_cuda.defines())
    cases["copy-ranges"] = (device_copy.SOURCE, device_copy.defines())
    cases["ipc-signal"] = (ipc_signal.SOURCE, ipc_signal.defines())
    for d in (1, 64, decode_cuda.MAX_HEAD_DIM):
        for bf16 in (False, True):
            cases[f"decode-{'bf16' if bf16 else 'fp32'}-D{d}"] = (decode_cuda.SOURCE, decode_cuda.defines(d, bf16))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def compiled():
    """{(CUDA version, case id): (ok, log)} for every NVRTC found, compiled in parallel (NVRTC releases the GIL)."""
    options = [*cuda_build.NVRTC_OPTIONS, f"-arch={ARCH}", "-Xptxas=-v"]
    jobs = [(version, case) for version in NVRTCS for case in CASES]

    def build(job):
        version, case = job
        return nvrtc_compile(NVRTCS[version], cuda_build.kernel_source(*CASES[case]), options)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(jobs, pool.map(build, jobs)))


@needs_nvrtc
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_sm90(compiled, case):
    for version in NVRTCS:
        ok, log = compiled[version, case]
        assert ok, f"CUDA {version}:\n{log}"
        assert "error" not in log.lower(), f"CUDA {version}:\n{log}"


@needs_nvrtc
def test_missing_define_is_an_error():
    """Each define the host passes is required: leaving one out stops the compile with the #error text."""
    lib = next(iter(NVRTCS.values()))
    options = [*cuda_build.NVRTC_OPTIONS, f"-arch={ARCH}"]
    kernel = ag.choose_kernel(64, True)
    for name in ("HEAD_DIM", "MMA_BN", "SMEM_BYTES"):
        defines = {n: v for n, v in kernel.defines().items() if n != name}
        ok, log = nvrtc_compile(lib, cuda_build.kernel_source(kernel.source, defines), options)
        assert not ok and f"{name} must be defined by the host" in log, log
    for source, full in ((passes_cuda.SOURCE, passes_cuda.defines()), (decode_cuda.SOURCE, decode_cuda.defines(64, True)),
                         (small_rows_cuda.SOURCE, small_rows_cuda.defines()),
                         (ipc_signal.SOURCE, ipc_signal.defines())):
        for name in full:
            defines = {n: v for n, v in full.items() if n != name}
            ok, log = nvrtc_compile(lib, cuda_build.kernel_source(source, defines), options)
            assert not ok and f"{name} must be defined by the host" in log, log
    # a layout that disagrees with the kernel's indexing does not compile either
    defines = {**kernel.defines(), "SMEM_V": kernel.defines()["SMEM_V"] + 16}
    ok, log = nvrtc_compile(lib, cuda_build.kernel_source(kernel.source, defines), options)
    assert not ok and "shared layout" in log, log
