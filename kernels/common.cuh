// Definitions shared by the CUDA sources in kernels/.
//
// NVRTC compiles each source as its own program (one CuPy RawModule per source and preamble), with no
// include path into this folder, so the host does the including: rshard_hpc/ops/attention_cuda.py
// (kernel_source) builds every program as
//   its #define preamble  +  this file  +  the .cu source
// A definition that two sources (or two kernels of one source) need is written here once. This file
// needs no define from the host (bf16_bits exists where a source defines BF16_NAN, which it requires;
// block_sum where it defines PASS_THREADS).

#define NEG_INF __int_as_float(0xff800000)
#define LN2 0.6931471805599453f  // ln 2: a base-2 log-sum-exp times LN2 is the natural one

// Wire elements (ops/precision.py): float32, or bf16 as uint16 bit patterns. wire_value: the element's float32
// value (bf16 widened, exact). wire_lse: the float32 lse stored at element a: one float, or under bf16 its two
// uint16 halves, low half first (precision.pack_partial).
__device__ __forceinline__ float wire_value(float x) { return x; }
__device__ __forceinline__ float wire_value(unsigned short bits) { return __uint_as_float((unsigned int)bits << 16); }
__device__ __forceinline__ float wire_lse(const float* w, long long a) { return w[a]; }
__device__ __forceinline__ float wire_lse(const unsigned short* w, long long a) {
    return __uint_as_float((unsigned int)w[a] | ((unsigned int)w[a + 1] << 16));
}

#ifdef BF16_NAN  // the sources that write bf16 ask the host for its NaN pattern (passes.cu, decode.cu)
// bf16 bits of x, rounded to nearest even, NaN -> BF16_NAN: exactly ops/precision.to_bf16_bits.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    const unsigned int b = __float_as_uint(x);
    return isnan(x) ? (unsigned short)BF16_NAN : (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
#endif

#ifdef PASS_THREADS  // the sources whose blocks are PASS_THREADS threads (passes.cu, small_rows.cu)
// The sum of v over the block (PASS_THREADS threads), returned to every thread. `red` holds PASS_THREADS / 32
// floats. Order: each warp by xor-shuffle, then warp 0 over the warps' sums.
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int s = 16; s > 0; s >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, s));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // red may still be read by the previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < PASS_THREADS / 32 ? red[lane] : 0.f;
    for (int s = 16; s > 0; s >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, s));
    return v;
}
#endif

// Element idx of a contiguous (n, H, D) array: its row, head and dim (the grid-stride kernels over o).
struct RowHeadDim { long long row, rh; int head, d; };  // rh = row * H + head

__device__ __forceinline__ RowHeadDim row_head_dim(long long idx, int H, int D) {
    RowHeadDim at;
    at.d = (int)(idx % D);
    at.rh = idx / D;
    at.head = (int)(at.rh % H);
    at.row = at.rh / H;
    return at;
}

// Tile summary: one int4 per tile of rows sorted by (sequence, position), over the tile's rows
//   x = seq_min, y = seq_max, z = pos_min, w = pos_max.
// attention_order.cu (tile_info) writes them; partial_attention.cu reads them through tile_kind.

// What key tile ki is to query tile qi. Visible: same sequence and, when causal, pos_k <= pos_q.
//   0: no key of the tile is visible to any query of the tile (skip it)
//   1: every key is visible to every query (no element mask)
//   2: anything else (mask element by element)
// full: the key tile has no rows past the last key (a partial last tile always takes the mask).
__device__ __forceinline__ int tile_kind(int4 qi, int4 ki, int causal, int full) {
    if (ki.y < qi.x || ki.x > qi.y) return 0;               // no common sequence
    if (causal && ki.z > qi.w) return 0;                     // every key after every query
    if (full && qi.x == qi.y && ki.x == ki.y && qi.x == ki.x && (!causal || ki.w <= qi.z)) return 1;
    return 2;
}

// Key split (flash-decoding): with gridDim.z > 1 the key tiles a query tile may see ([lo, hi) of k_range, in
// tiles of bn keys) are shared out among the blocks z = 0 … gridDim.z-1 in contiguous equal runs; block z
// writes its own partial (o, lse) at slot z of (gridDim.z, nq, heads, …) outputs and the host merges the
// slots exactly (merge.cu). A block whose run is empty writes (0, -inf). gridDim.z == 1 is the whole range.
struct KeySplit { int lo, hi; long long o_offset; };

__device__ __forceinline__ KeySplit key_split(const int* k_range, int qt, int bn) {
    const int first = k_range[2 * qt] / bn;
    const int end = (k_range[2 * qt + 1] + bn - 1) / bn;
    const int per = (end - first + (int)gridDim.z - 1) / (int)gridDim.z;
    KeySplit share;
    share.lo = min(end, first + (int)blockIdx.z * per);
    share.hi = min(end, share.lo + per);
    share.o_offset = blockIdx.z;
    return share;
}

// The exact merge of P partial attention results for one element of o (architecture.md §1):
//   L = logsumexp_p(lse_p),  o = sum_p exp(lse_p - L) o_p / sum_p exp(lse_p - L).
// lse_of(p), o_of(p): part p's lse and o element. Writes L to *lse; all -inf parts give (0, -inf).
// merge.cu (strided float32 views) and passes.cu (the packed receive buffer) both merge through this.
template <class LseOf, class OOf>
__device__ __forceinline__ float merge_element(int P, LseOf lse_of, OOf o_of, float* lse) {
    float top = NEG_INF;
    for (int p = 0; p < P; ++p) top = fmaxf(top, lse_of(p));
    if (top == NEG_INF) {
        *lse = NEG_INF;
        return 0.f;
    }
    float wsum = 0.f, acc = 0.f;
    for (int p = 0; p < P; ++p) {
        const float w = expf(lse_of(p) - top);
        wsum += w;
        acc = fmaf(w, o_of(p), acc);
    }
    *lse = top + logf(wsum);
    return acc / wsum;
}
