// Preparation for partial_attention.cu: rows sorted by (sequence, position), per-tile summaries and the
// key range each query tile may see. Loaded by rshard_hpc/ops/attention_cuda.py after kernels/common.cuh; needs
// no define. Every kernel here takes its sizes as arguments and works for any block size.
//
// Sort key of a row: seq * 2^32 + (pos + 2^31), an int64 ordering rows by sequence, then position, for
// any int32 seq and pos.

extern "C" __global__ void make_keys(const int* __restrict__ pos, const int* __restrict__ seq,
                                     long long* __restrict__ key, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        key[i] = (long long)seq[i] * 4294967296LL + ((long long)pos[i] + 2147483648LL);
}

// Sorted slot i takes original row order[i].
extern "C" __global__ void gather_sorted(const long long* __restrict__ order, const int* __restrict__ pos,
                                         const int* __restrict__ seq, const long long* __restrict__ key,
                                         int* __restrict__ idx, int* __restrict__ s_pos, int* __restrict__ s_seq,
                                         long long* __restrict__ s_key, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int r = (int)order[i];
        idx[i] = r;
        s_pos[i] = pos[r];
        s_seq[i] = seq[r];
        s_key[i] = key[r];
    }
}

// info[t]: the tile summary (common.cuh) of sorted rows [t * tile, (t + 1) * tile) ∩ [0, n).
extern "C" __global__ void tile_info(const int* __restrict__ s_pos, const int* __restrict__ s_seq, int n, int tile,
                                     int n_tiles, int4* __restrict__ info)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tiles) return;
    const int a = t * tile, b = min(a + tile, n);
    // sorted by (seq, pos): seq_min / seq_max are the ends; positions need a scan
    int pmin = s_pos[a], pmax = s_pos[a];
    for (int i = a + 1; i < b; ++i) {
        pmin = min(pmin, s_pos[i]);
        pmax = max(pmax, s_pos[i]);
    }
    info[t] = make_int4(s_seq[a], s_seq[b - 1], pmin, pmax);
}

__device__ __forceinline__ int lower_bound(const long long* a, int n, long long x) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// range[2 t], range[2 t + 1]: the sorted keys query tile t may see lie in [lo, hi): from the first key of
// the tile's first sequence to the last key (seq, pos) <= the tile's last row (causal) or the end of its
// last sequence (bidirectional).
extern "C" __global__ void key_ranges(const long long* __restrict__ q_key, int nq, int tile, int n_tiles,
                                      const long long* __restrict__ k_key, int nk, int causal,
                                      int* __restrict__ range)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tiles) return;
    const long long first = q_key[t * tile];
    const long long last = q_key[min((t + 1) * tile, nq) - 1];
    const long long seq_first = first >> 32, seq_last = last >> 32;
    range[2 * t] = lower_bound(k_key, nk, seq_first * 4294967296LL);
    range[2 * t + 1] = causal ? lower_bound(k_key, nk, last + 1)
                              : lower_bound(k_key, nk, (seq_last + 1) * 4294967296LL);
}

// K and V (n, Hkv, D) bf16 -> (Hkv, n_pad, D) in sorted row order, zero rows from n to n_pad: a key tile of
// one head is then one contiguous block for the tensor-core kernel. One thread per 16-byte chunk.
extern "C" __global__ void gather_kv(const uint4* __restrict__ k, const uint4* __restrict__ v,
                                     const int* __restrict__ idx, int n, int n_pad, int n_kv, int chunks,
                                     uint4* __restrict__ k_out, uint4* __restrict__ v_out)
{
    const long long total = (long long)n_kv * n_pad * chunks;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(e % chunks);
        const long long hs = e / chunks;
        const int slot = (int)(hs % n_pad);
        const int hk = (int)(hs / n_pad);
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        if (slot < n) {
            const long long src = ((long long)idx[slot] * n_kv + hk) * chunks + c;
            kv = k[src];
            vv = v[src];
        }
        k_out[e] = kv;
        v_out[e] = vv;
    }
}
