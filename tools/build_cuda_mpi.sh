#!/bin/bash
# A CUDA-aware Open MPI 4.1 and mpi4py against it, from sources carried in a folder (no registry needed), into
# a relocatable prefix; then the checks that say whether it is CUDA-aware (README: "GPU transports").
#
# usage: bash tools/build_cuda_mpi.sh [all|ompi|mpi4py|check]        (default all: the three in turn)
#   SRC=REPO/.big      where the sources are: openmpi_4.1*.orig.tar.* or openmpi-4.1*.tar.* (Debian's
#                      `apt-get source --download-only openmpi` or open-mpi.org), mpi4py-*.tar.gz (an sdist;
#                      one with src/mpi4py/MPI.c already made by Cython needs no Cython here)
#   PREFIX=/tmp/ompi-cuda   where it goes; relocatable: `. PREFIX/env.sh` sets OPAL_PREFIX, PATH,
#                      LD_LIBRARY_PATH and PYTHONPATH from wherever the folder lies
#   CUDA_HOME          the CUDA toolkit (default: from nvcc on PATH, else /usr/local/cuda*)
#   JOBS=$(nproc)  BUILD=/tmp/ompi-build  WITH_UCX=1 (also build the UCX PML where ucp/api/ucp.h exists)
# Left out to keep the build short (a few minutes on 16 cores): Fortran, Java, OpenSHMEM, ROMIO; mpi4py
# compiles its one 13 MB C file (made by Cython, carried in the sdist) at -O0: its calls only hand buffers over.
set -euo pipefail
WHAT=${1:-all}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "${SRC:-$REPO/.big}" && pwd)
PREFIX=${PREFIX:-/tmp/ompi-cuda}
BUILD=${BUILD:-/tmp/ompi-build}
JOBS=${JOBS:-$(nproc)}
say() { echo "[build_cuda_mpi $(date -u +%T)] $*"; }
fail() { echo "[build_cuda_mpi] FAILED: $*" >&2; exit 1; }
logtail() { echo "--- last lines of $1:" >&2; tail -n 40 "$1" >&2; }

find_cuda() {
  # the first of: CUDA_HOME, CUDA_PATH, the toolkit of the nvcc on PATH, /usr/local/cuda*, /usr; with include/cuda.h
  local nvcc_home="" d
  command -v nvcc >/dev/null && nvcc_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$nvcc_home" /usr/local/cuda /usr/local/cuda-* /usr; do
    [ -n "$d" ] && [ -f "$d/include/cuda.h" ] && { CUDA_HOME=$d; break; }
  done
  [ -f "${CUDA_HOME:-/nonexistent}/include/cuda.h" ] || fail "no CUDA toolkit with include/cuda.h (set CUDA_HOME)"
  say "CUDA: $CUDA_HOME (CUDA_VERSION $(grep -m1 '#define CUDA_VERSION' "$CUDA_HOME/include/cuda.h" | awk '{print $3}'))"
}

build_ompi() {
  find_cuda
  local tarball
  tarball=$(ls "$SRC"/openmpi[-_]4.1*.tar.* 2>/dev/null | head -n 1) || true
  [ -n "$tarball" ] || fail "no openmpi 4.1 source tarball in $SRC"
  say "unpacking $(basename "$tarball") into $BUILD/ompi"
  rm -rf "$BUILD/ompi" && mkdir -p "$BUILD/ompi"
  tar -xf "$tarball" -C "$BUILD/ompi" --strip-components=1
  local ucx=(--without-ucx)
  if [ -n "${WITH_UCX:-}" ]; then
    for d in ${UCX_HOME:-} /usr /usr/local /opt/ucx; do
      [ -n "$d" ] && [ -f "$d/include/ucp/api/ucp.h" ] && { ucx=(--with-ucx="$d"); break; }
    done
    [ "${ucx[0]}" = --without-ucx ] && say "WITH_UCX: no ucp/api/ucp.h found, building without UCX"
  fi
  cd "$BUILD/ompi"
  say "configure (--with-cuda=$CUDA_HOME ${ucx[*]}); log $BUILD/ompi/configure.out"
  ./configure --prefix="$PREFIX" --with-cuda="$CUDA_HOME" "${ucx[@]}" \
      --disable-mpi-fortran --disable-oshmem --disable-mpi-java --disable-io-romio --disable-static \
      --without-verbs --without-ofi --without-psm --without-psm2 --without-libfabric \
      --with-hwloc=internal --with-libevent=internal --with-pmix=internal \
      > configure.out 2>&1 || { logtail config.log; fail "configure"; }
  grep -q "^#define OPAL_CUDA_SUPPORT 1" opal/include/opal_config.h || fail "configure did not turn CUDA support on"
  if [ "${STOP_AFTER:-}" = configure ]; then say "configured (STOP_AFTER=configure)"; return; fi
  say "make -j$JOBS; log $BUILD/ompi/make.out"
  make -j"$JOBS" > make.out 2>&1 || { grep -m 20 -B2 -A6 "error:" make.out >&2 || true; logtail make.out; fail "make"; }
  make install > install.out 2>&1 || { logtail install.out; fail "make install"; }
  cat > "$PREFIX/env.sh" <<'EOF'
# . this file: the CUDA-aware Open MPI (and its mpi4py) first, wherever this folder now lies
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX=$here PATH=$here/bin:$PATH LD_LIBRARY_PATH=$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -d "$here/python/mpi4py" ] && export PYTHONPATH=$here/python${PYTHONPATH:+:$PYTHONPATH}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none  # no CMA in containers
EOF
  say "installed into $PREFIX ($(du -sh "$PREFIX" | cut -f1))"
}

build_mpi4py() {
  local sdist
  sdist=$(ls "$SRC"/mpi4py-*.tar.gz 2>/dev/null | head -n 1) || true
  [ -n "$sdist" ] || { say "no mpi4py sdist in $SRC: the machine's mpi4py will load this libmpi.so.40 (same soname)"; return; }
  [ -x "$PREFIX/bin/mpicc" ] || fail "no $PREFIX/bin/mpicc: build Open MPI first"
  rm -rf "$BUILD/mpi4py" "$PREFIX/python" && mkdir -p "$BUILD/mpi4py"
  tar -xzf "$sdist" -C "$BUILD/mpi4py" --strip-components=1
  say "mpi4py from $(basename "$sdist") with MPICC=$PREFIX/bin/mpicc; log $BUILD/mpi4py/build.out"
  # env.sh first: a relocated prefix's wrapper compiler finds its own libopen-pal and data files only through
  # LD_LIBRARY_PATH and OPAL_PREFIX (else it fails, or picks up a system Open MPI's of the same soname)
  # shellcheck disable=SC1091
  # LDSHARED: the wrapper links, so this prefix's libmpi comes before any other on Python's own library path (a
  # pip-installed MPICH there took the link otherwise)
  if ! (. "$PREFIX/env.sh" && cd "$BUILD/mpi4py" && MPICC=$PREFIX/bin/mpicc CFLAGS="-O0 -I$PREFIX/include" \
        LDSHARED="$PREFIX/bin/mpicc -shared" LDFLAGS="-L$PREFIX/lib" python3 -m pip install \
        --no-build-isolation --no-index --no-deps --no-cache-dir --target "$PREFIX/python" . > build.out 2>&1); then
    logtail "$BUILD/mpi4py/build.out"
    rm -rf "$PREFIX/python"
    say "mpi4py did not build (above): the machine's mpi4py will load this libmpi.so.40 (same soname) instead"
  fi
}

check() {
  # shellcheck disable=SC1091
  . "$PREFIX/env.sh"
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$REPO
  say "ompi_info: $(ompi_info --parsable --all | grep -E 'mpi_built_with_cuda_support:value' || echo 'no such line')"
  python3 - <<'EOF'
import ctypes, os
import mpi4py
from mpi4py import MPI
lib = next(p.split()[-1] for p in open("/proc/self/maps") if "libmpi.so" in p)
query = getattr(ctypes.CDLL(lib), "MPIX_Query_cuda_support", None)
print(f"[check] mpi4py {mpi4py.__version__} from {os.path.dirname(mpi4py.__file__)}")
print(f"[check] libmpi: {lib}; {MPI.Get_library_version().splitlines()[0][:80]}")
print(f"[check] MPIX_Query_cuda_support() = {query() if query else 'absent'}")
from rshard_hpc.dist.cuda_aware import detect_cuda_aware
aware, why = detect_cuda_aware()
print(f"[check] rshard: CUDA-aware {'YES' if aware else 'NO'} ({why})")
EOF
}

case $WHAT in
  all) build_ompi; build_mpi4py; check ;;
  ompi) build_ompi ;;
  mpi4py) build_mpi4py ;;
  check) check ;;
  *) fail "usage: $0 [all|ompi|mpi4py|check]" ;;
esac
