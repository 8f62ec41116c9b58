// Partial attention for ragged batches with a positions-based mask (architecture.md §1, §7).
//
// Loaded as text by rshard_hpc/ops/attention_cuda.py, which compiles it with NVRTC for the running GPU as
// (preamble of #defines) + kernels/common.cuh + this file. Every size below comes from that preamble;
// nothing here has a default, so host and kernel cannot disagree. Always defined:
//   ATTN_MMA  1: build attn_fwd_mma (tensor cores); 0: build attn_fwd_simt (CUDA cores)
//   HEAD_DIM  the head dimension D
//   IN_BF16   1: q, k, v are bf16 bit patterns (unsigned short); 0: float32
// and the kernel's own configuration (listed at each kernel).
//
// Rows are visited in an order sorted by (sequence, position), given by q_idx / k_idx (sorted slot ->
// original row); outputs are written back to the original rows. The tensor-core kernel takes K and V
// already gathered into that order, per KV head (kernels/attention_order.cu: gather_kv), and nk_pad in
// place of k_idx. Per tile the host gives
//   q_info[t] = tile summary of query tile t (common.cuh: int4 {seq_min, seq_max, pos_min, pos_max}),
//   k_info[t] = the same for key tile t (tiles of the kernel's key-tile size, aligned to 0),
//   k_range[t] = {lo, hi}: the sorted keys that any query of tile t may see lie in [lo, hi).
// A key tile is skipped when no key of it can be visible, and computed without a mask when every
// key is visible to every query of the tile (common.cuh: tile_kind).
// Output: o (nq, Hq, D) float32, lse (nq, Hq) float32 (natural log); a row with no visible key gets
// o = 0, lse = -inf.
//
// scale_log2 = scale * log2(e) > 0: the host refuses any other scale (attention.check_scale).

#ifndef ATTN_MMA
#error "ATTN_MMA must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef HEAD_DIM
#error "HEAD_DIM must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef IN_BF16
#error "IN_BF16 must be defined by the host (rshard_hpc attention launch layer)"
#endif


#if IN_BF16
typedef unsigned short in_t;
__device__ __forceinline__ float load_in(const in_t* p) { return wire_value(*p); }
#else
typedef float in_t;
__device__ __forceinline__ float load_in(const in_t* p) { return *p; }
#endif

#if !ATTN_MMA
// ---------------------------------------------------------------------------------------------
// Simple kernel (CUDA cores, fp32 math): any HEAD_DIM the host accepts, fp32 or bf16 inputs.
// SIMT_TPR threads share one query row, each holding DPT = HEAD_DIM / SIMT_TPR dimensions of q and of
// the output accumulator. SIMT_BM query rows (sorted order) per block of SIMT_THREADS threads,
// SIMT_BN keys per shared tile (static shared memory: 2 * SIMT_BN * HEAD_DIM floats).
// Host: attention_cuda.SimtKernel.
// ---------------------------------------------------------------------------------------------
#ifndef SIMT_THREADS
#error "SIMT_THREADS must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SIMT_TPR
#error "SIMT_TPR must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SIMT_BM
#error "SIMT_BM must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SIMT_BN
#error "SIMT_BN must be defined by the host (rshard_hpc attention launch layer)"
#endif
#if SIMT_BM * SIMT_TPR != SIMT_THREADS || HEAD_DIM % SIMT_TPR || SIMT_TPR > 32 || (SIMT_TPR & (SIMT_TPR - 1))
#error "SIMT_BM * SIMT_TPR == SIMT_THREADS, SIMT_TPR a power of 2 <= 32 dividing HEAD_DIM required"
#endif
#define DPT (HEAD_DIM / SIMT_TPR)

extern "C" __global__ void __launch_bounds__(SIMT_THREADS)
attn_fwd_simt(const in_t* __restrict__ q, const in_t* __restrict__ k, const in_t* __restrict__ v,
              const int* __restrict__ q_idx, const int* __restrict__ k_idx,
              const int* __restrict__ qs_pos, const int* __restrict__ qs_seq,
              const int* __restrict__ ks_pos, const int* __restrict__ ks_seq,
              const int* __restrict__ q_info, const int* __restrict__ k_info, const int* __restrict__ k_range,
              float* __restrict__ o, float* __restrict__ lse,
              int nq, int nk, int n_heads, int n_kv_heads, float scale_log2, int causal)
{
    __shared__ float sK[SIMT_BN][HEAD_DIM];
    __shared__ float sV[SIMT_BN][HEAD_DIM];
    __shared__ int sPos[SIMT_BN];
    __shared__ int sSeq[SIMT_BN];

    const int qt = blockIdx.x;
    const int h = blockIdx.y;
    const int hk = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x;
    const int r = qt * SIMT_BM + tid / SIMT_TPR;       // sorted query slot
    const int part = tid % SIMT_TPR;                    // which DPT-slice of the head dimension
    const bool valid = r < nq;

    float qr[DPT], acc[DPT];
    int my_pos = 0, my_seq = 0, row = 0;
    if (valid) {
        row = q_idx[r];
        my_pos = qs_pos[r];
        my_seq = qs_seq[r];
        const in_t* qp = q + ((long long)row * n_heads + h) * HEAD_DIM + part * DPT;
#pragma unroll
        for (int d = 0; d < DPT; ++d) qr[d] = load_in(qp + d) * scale_log2;
    } else {
#pragma unroll
        for (int d = 0; d < DPT; ++d) qr[d] = 0.f;
    }
#pragma unroll
    for (int d = 0; d < DPT; ++d) acc[d] = 0.f;
    float m = NEG_INF, l = 0.f;

    const int4 qi = *(const int4*)(q_info + 4 * qt);
    const int4* k_info4 = (const int4*)k_info;
    const KeySplit share = key_split(k_range, qt, SIMT_BN);
    o += share.o_offset * nq * n_heads * HEAD_DIM;
    lse += share.o_offset * nq * n_heads;
    for (int kt = share.lo; kt < share.hi; ++kt) {
        const int base = kt * SIMT_BN;
        const int kind = tile_kind(qi, k_info4[kt], causal, base + SIMT_BN <= nk);
        if (kind == 0) continue;                          // uniform over the block
        __syncthreads();
        for (int e = tid; e < SIMT_BN * HEAD_DIM; e += SIMT_THREADS) {
            const int j = e / HEAD_DIM, d = e % HEAD_DIM;
            float kv = 0.f, vv = 0.f;
            if (base + j < nk) {
                const long long off = ((long long)k_idx[base + j] * n_kv_heads + hk) * HEAD_DIM + d;
                kv = load_in(k + off);
                vv = load_in(v + off);
            }
            sK[j][d] = kv;
            sV[j][d] = vv;
        }
        if (tid < SIMT_BN) {
            const bool in = base + tid < nk;
            sPos[tid] = in ? ks_pos[base + tid] : 0;
            sSeq[tid] = in ? ks_seq[base + tid] : 0;
        }
        __syncthreads();

        float s[SIMT_BN];
        float tile_max = NEG_INF;
#pragma unroll
        for (int j = 0; j < SIMT_BN; ++j) {
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < DPT; ++d) dot = fmaf(qr[d], sK[j][part * DPT + d], dot);
#pragma unroll
            for (int w = 1; w < SIMT_TPR; w <<= 1) dot += __shfl_xor_sync(0xffffffff, dot, w);
            bool vis = true;
            if (kind == 2)
                vis = (base + j < nk) && sSeq[j] == my_seq && (!causal || sPos[j] <= my_pos);
            s[j] = vis ? dot : NEG_INF;
            tile_max = fmaxf(tile_max, s[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        const float m_use = (m_new == NEG_INF) ? 0.f : m_new;
        const float corr = exp2f(m - m_use);
        l *= corr;
#pragma unroll
        for (int d = 0; d < DPT; ++d) acc[d] *= corr;
#pragma unroll
        for (int j = 0; j < SIMT_BN; ++j) {
            const float p = exp2f(s[j] - m_use);
            l += p;
#pragma unroll
            for (int d = 0; d < DPT; ++d) acc[d] = fmaf(p, sV[j][part * DPT + d], acc[d]);
        }
        m = m_new;
    }
    if (!valid) return;
    float* op = o + ((long long)row * n_heads + h) * HEAD_DIM + part * DPT;
    const float inv = (l > 0.f) ? 1.f / l : 0.f;
#pragma unroll
    for (int d = 0; d < DPT; ++d) op[d] = acc[d] * inv;
    if (part == 0) lse[(long long)row * n_heads + h] = (l > 0.f) ? (m + log2f(l)) * LN2 : NEG_INF;
}
#else  // ATTN_MMA

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 mma.sync m16n8k16, fp32 accumulate): bf16 inputs, HEAD_DIM % 16 == 0.
// MMA_WARPS warps (MMA_THREADS threads); each warp owns MMA_MT slabs of 16 query rows (MMA_BM rows per
// block), so every K/V fragment read from shared memory feeds MMA_MT matrix products, and every K/V
// tile brought into shared memory serves MMA_BM query rows. MMA_BN keys per tile, K/V in MMA_STAGES
// shared-memory stages filled by cp.async MMA_STAGES - 1 tiles ahead (K, V pre-gathered per head in sorted
// order), one barrier per tile. Shared rows are SMEM_ROW bf16 elements long (HEAD_DIM plus padding, so
// that ldmatrix is free of bank conflicts).
// Q fragments stay in registers (Q_IN_REGS) or are re-read from shared memory per tile (large head dims).
// Scores stay in registers; online softmax in base 2 on raw scores (the scale is folded into one FMA
// before ex2); the accumulator is rescaled only when some row's running maximum moved (warp vote).
// Which key tiles to visit (and which need the element mask) is decided 32 tiles at a time by a warp
// vote over the tile summaries, so no global load sits between one tile and the next.
// Configuration (host: attention_cuda.MmaConfig, attention_cuda.MmaKernel): MMA_MT, Q_IN_REGS, MMA_WARPS,
// MMA_THREADS, MMA_BM, MMA_BN, MMA_STAGES, MMA_MINB (blocks per SM the register allocation must allow:
// __launch_bounds__'s second argument), and the dynamic shared-memory layout, in bytes from its start:
//   [0, SMEM_K)            sQ    [MMA_BM][SMEM_ROW]              bf16
//   [SMEM_K, SMEM_V)       sK    [MMA_STAGES][MMA_BN][SMEM_ROW]  bf16
//   [SMEM_V, SMEM_POS)     sV    [MMA_STAGES][MMA_BN][SMEM_ROW]  bf16
//   [SMEM_POS, SMEM_SEQ)   sPos  [MMA_STAGES][MMA_BN]            int
//   [SMEM_SEQ, SMEM_BYTES) sSeq  [MMA_STAGES][MMA_BN]            int
// ---------------------------------------------------------------------------------------------
#ifndef MMA_MT
#error "MMA_MT must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef Q_IN_REGS
#error "Q_IN_REGS must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_WARPS
#error "MMA_WARPS must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_THREADS
#error "MMA_THREADS must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_BM
#error "MMA_BM must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_BN
#error "MMA_BN must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_STAGES
#error "MMA_STAGES must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef MMA_MINB
#error "MMA_MINB must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_ROW
#error "SMEM_ROW must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_K
#error "SMEM_K must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_V
#error "SMEM_V must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_POS
#error "SMEM_POS must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_SEQ
#error "SMEM_SEQ must be defined by the host (rshard_hpc attention launch layer)"
#endif
#ifndef SMEM_BYTES
#error "SMEM_BYTES must be defined by the host (rshard_hpc attention launch layer)"
#endif
#if !IN_BF16 || HEAD_DIM % 16
#error "the tensor-core kernel needs bf16 inputs and HEAD_DIM % 16 == 0"
#endif
#if MMA_STAGES < 2 || MMA_BN % 16 || MMA_BN > 128
#error "MMA_STAGES >= 2 and MMA_BN in {16, 32, ..., 128} required"
#endif
#if MMA_THREADS != 32 * MMA_WARPS || MMA_BM != 16 * MMA_MT * MMA_WARPS
#error "MMA_THREADS must be 32 * MMA_WARPS and MMA_BM 16 * MMA_MT * MMA_WARPS"
#endif
// The layout the host computed must be the one the indexing below uses, with 16-byte aligned regions
// (cp.async and ldmatrix move 16-byte rows of 8 bf16).
static_assert(SMEM_ROW >= HEAD_DIM && SMEM_ROW % 8 == 0, "SMEM_ROW: HEAD_DIM plus padding, 16-byte rows");
static_assert(SMEM_K == MMA_BM * SMEM_ROW * sizeof(unsigned short), "shared layout: sQ");
static_assert(SMEM_V - SMEM_K == MMA_STAGES * MMA_BN * SMEM_ROW * sizeof(unsigned short), "shared layout: sK");
static_assert(SMEM_POS - SMEM_V == MMA_STAGES * MMA_BN * SMEM_ROW * sizeof(unsigned short), "shared layout: sV");
static_assert(SMEM_SEQ - SMEM_POS == MMA_STAGES * MMA_BN * sizeof(int), "shared layout: sPos");
static_assert(SMEM_BYTES - SMEM_SEQ == MMA_STAGES * MMA_BN * sizeof(int), "shared layout: sSeq");
static_assert(SMEM_K % 16 == 0 && SMEM_V % 16 == 0 && SMEM_POS % 16 == 0 && SMEM_SEQ % 16 == 0,
              "shared regions must start on 16 bytes");

#define CH (HEAD_DIM / 8)            // 16-byte chunks per row

// ------------------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in_bounds) {
    const int n = in_bounds ? 16 : 0;   // 0: fill with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in_bounds) {
    const int n = in_bounds ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c (16x8 fp32) += a (16x16 bf16) * b (16x8 bf16)
__device__ __forceinline__ void mma_bf16(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {   // ex2.approx(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ------------------------------------------------------------------------- per-thread state
// Fragment layouts (mma.m16n8k16): a thread holds rows lane/4 and lane/4 + 8 (index hh = 0, 1) of each
// 16-row slab mt, and columns 2 * (lane % 4) + {0, 1} of each 8-column block nt.
typedef float Scores[MMA_MT][MMA_BN / 8][4];          // S tile: 16*MMA_MT x MMA_BN per warp
typedef float Accum[MMA_MT][HEAD_DIM / 8][4];         // O accumulator: 16*MMA_MT x HEAD_DIM per warp
typedef unsigned int PFrags[MMA_MT][MMA_BN / 16][4];  // P as bf16 A fragments, one per 16-key step
typedef float RowF[MMA_MT][2];                        // per row: running max m, row sum l
typedef int RowI[MMA_MT][2];                          // per row: position, sequence

// Shared-memory regions (layout above).
struct Smem {
    unsigned short* q;   // [MMA_BM][SMEM_ROW]
    unsigned short* k;   // [MMA_STAGES][MMA_BN][SMEM_ROW]
    unsigned short* v;   // [MMA_STAGES][MMA_BN][SMEM_ROW]
    int* pos;            // [MMA_STAGES][MMA_BN]
    int* seq;            // [MMA_STAGES][MMA_BN]
};

__device__ __forceinline__ Smem smem_regions(unsigned char* smem) {
    Smem sm;
    sm.q = (unsigned short*)smem;
    sm.k = (unsigned short*)(smem + SMEM_K);
    sm.v = (unsigned short*)(smem + SMEM_V);
    sm.pos = (int*)(smem + SMEM_POS);
    sm.seq = (int*)(smem + SMEM_SEQ);
    return sm;
}

// ------------------------------------------------------------------------- which key tiles
// The key tiles one query tile visits, 32 at a time: bit i of vis / masked says whether tile base + i is
// visited / needs the element mask. Every warp keeps its own copy (same values in every warp); calls
// must come from all 32 lanes.
struct TileScan {
    int base;
    unsigned int vis, masked;
};

// The first visited tile t' >= t (kt_end if none), and whether it needs the element mask.
__device__ __forceinline__ int next_tile(TileScan& sc, int t, int kt_end, int4 qi, const int4* k_info4,
                                         int causal, int nk, int lane, int& kind_masked) {
    while (t < kt_end) {
        if (t >= sc.base + 32) {   // refill the window at t
            sc.base = t;
            const int tt = t + lane;
            const int kd = tt < kt_end ? tile_kind(qi, __ldg(k_info4 + tt), causal, (tt + 1) * MMA_BN <= nk) : 0;
            sc.vis = __ballot_sync(0xffffffffu, kd != 0);
            sc.masked = __ballot_sync(0xffffffffu, kd == 2);
        }
        const int off = t - sc.base;
        const unsigned int rest = sc.vis >> off;
        if (rest) {
            const int i = off + __ffs(rest) - 1;
            kind_masked = (sc.masked >> i) & 1;
            return sc.base + i;
        }
        t = sc.base + 32;
    }
    kind_masked = 0;
    return kt_end;
}

// The visited key tiles in flight, in order: tile[0] is computed now, tile[MMA_STAGES - 1] is loaded now.
struct Pipe {
    int tile[MMA_STAGES], masked[MMA_STAGES];
};

// Drop tile[0], take the next visited tile at the end (uniform work; a global load once per 32 tiles).
__device__ __forceinline__ void pipe_advance(Pipe& pipe, TileScan& scan, int kt_end, int4 qi, const int4* k_info4,
                                             int causal, int nk, int lane) {
#pragma unroll
    for (int p = 0; p < MMA_STAGES - 1; ++p) {
        pipe.tile[p] = pipe.tile[p + 1];
        pipe.masked[p] = pipe.masked[p + 1];
    }
    pipe.tile[MMA_STAGES - 1] = next_tile(scan, pipe.tile[MMA_STAGES - 2] + 1, kt_end, qi, k_info4, causal, nk,
                                          lane, pipe.masked[MMA_STAGES - 1]);
}

// ------------------------------------------------------------------------- loads (cp.async, not committed)
// Query tile qt of head h -> sm.q (zeros past nq). q: (nq, n_heads, HEAD_DIM) original rows.
__device__ __forceinline__ void load_q_tile(const Smem& sm, const unsigned short* q, const int* q_idx, int qt,
                                            int h, int nq, long long q_row_stride, int tid) {
#pragma unroll
    for (int i = 0; i < (MMA_BM * CH + MMA_THREADS - 1) / MMA_THREADS; ++i) {
        const int c = tid + i * MMA_THREADS;
        if ((MMA_BM * CH) % MMA_THREADS == 0 || c < MMA_BM * CH) {
            const int rr = c / CH, ch = c % CH, slot = qt * MMA_BM + rr;
            const bool in = slot < nq;
            const unsigned short* src = q + (in ? q_idx[slot] * q_row_stride + h * HEAD_DIM + ch * 8 : 0);
            cp_async16(sm.q + rr * SMEM_ROW + ch * 8, src, in);
        }
    }
}

// Key tile `tile` -> stage: a contiguous (MMA_BN, HEAD_DIM) block of one head's gathered K and V
// (k_head, v_head: (nk_pad, HEAD_DIM)), and the keys' positions and sequences (zeros past nk).
__device__ __forceinline__ void load_kv_tile(const Smem& sm, const unsigned short* k_head,
                                             const unsigned short* v_head, const int* ks_pos, const int* ks_seq,
                                             int nk, int tile, int stage, int tid) {
    const int base = tile * MMA_BN;
    unsigned short* dk = sm.k + stage * MMA_BN * SMEM_ROW;
    unsigned short* dv = sm.v + stage * MMA_BN * SMEM_ROW;
    const unsigned short* src_k = k_head + (long long)base * HEAD_DIM;
    const unsigned short* src_v = v_head + (long long)base * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < (MMA_BN * CH + MMA_THREADS - 1) / MMA_THREADS; ++i) {
        const int c = tid + i * MMA_THREADS;
        if ((MMA_BN * CH) % MMA_THREADS == 0 || c < MMA_BN * CH) {
            const int j = c / CH, ch = c % CH;
            cp_async16(dk + j * SMEM_ROW + ch * 8, src_k + c * 8, true);
            cp_async16(dv + j * SMEM_ROW + ch * 8, src_v + c * 8, true);
        }
    }
#pragma unroll
    for (int i = 0; i < (2 * MMA_BN + MMA_THREADS - 1) / MMA_THREADS; ++i) {
        const int c = tid + i * MMA_THREADS;
        if (c < MMA_BN) {
            const bool in = base + c < nk;
            cp_async4(sm.pos + stage * MMA_BN + c, ks_pos + (in ? base + c : 0), in);
        } else if (c < 2 * MMA_BN) {
            const int t = c - MMA_BN;
            const bool in = base + t < nk;
            cp_async4(sm.seq + stage * MMA_BN + t, ks_seq + (in ? base + t : 0), in);
        }
    }
}

// A fragment (16x16 bf16) of query slab `row` (first row in the tile) for k-step ks, from shared memory.
__device__ __forceinline__ void ldmatrix_q(unsigned int* a, const unsigned short* sQ, int row, int ks, int lane) {
    ldmatrix_x4(a, sQ + (row + (lane % 16)) * SMEM_ROW + ks * 16 + (lane / 16) * 8);
}

// Q's A fragments for one k-step ks: a[mt] for each of this warp's slabs.
#if Q_IN_REGS
// Every k-step's fragments are loaded once (load_q_frags) and stay in registers.
struct QFrags {
    unsigned int r[MMA_MT][HEAD_DIM / 16][4];
};
__device__ __forceinline__ void load_q_frags(QFrags& qf, const unsigned short* sQ, int row_base, int lane) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) ldmatrix_q(qf.r[mt][ks], sQ, row_base + mt * 16, ks, lane);
}
__device__ __forceinline__ void q_frags_at(unsigned int (&a)[MMA_MT][4], const QFrags& qf, const unsigned short*,
                                           int, int ks, int) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[mt][e] = qf.r[mt][ks][e];
}
#else
// Re-read from shared memory at every k-step of every tile (fewer registers for large head dims).
struct QFrags {};
__device__ __forceinline__ void load_q_frags(QFrags&, const unsigned short*, int, int) {}
__device__ __forceinline__ void q_frags_at(unsigned int (&a)[MMA_MT][4], const QFrags&, const unsigned short* sQ,
                                           int row_base, int ks, int lane) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt) ldmatrix_q(a[mt], sQ, row_base + mt * 16, ks, lane);
}
#endif

// Position and sequence of this thread's rows (sorted slots; past nq: sequence -1, seeing no key).
__device__ __forceinline__ void load_row_ids(RowI& my_pos, RowI& my_seq, const int* qs_pos, const int* qs_seq,
                                             int first_slot, int nq, int lane) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int slot = first_slot + mt * 16 + lane / 4 + 8 * hh;
            my_pos[mt][hh] = slot < nq ? qs_pos[slot] : 0;
            my_seq[mt][hh] = slot < nq ? qs_seq[slot] : -1;
        }
}

__device__ __forceinline__ void init_rows(Accum& acc, RowF& m, RowF& l) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < HEAD_DIM / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }
}

// ------------------------------------------------------------------------- one key tile
// S = Q K^T for this warp's rows and the MMA_BN keys of cK ([MMA_BN][SMEM_ROW]): raw (unscaled) scores.
__device__ __forceinline__ void qk_tile(Scores& s, const QFrags& qf, const unsigned short* sQ,
                                        const unsigned short* cK, int row_base, int lane) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < MMA_BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
        unsigned int a[MMA_MT][4];
        q_frags_at(a, qf, sQ, row_base, ks, lane);
#pragma unroll
        for (int np = 0; np < MMA_BN / 16; ++np) {
            unsigned int b[4];
            ldmatrix_x4(b, cK + (np * 16 + (lane % 8) + (lane / 16) * 8) * SMEM_ROW + ks * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
            for (int mt = 0; mt < MMA_MT; ++mt) {
                mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// Element mask: scores of keys a row may not see -> -inf. cPos, cSeq: the tile's keys ([MMA_BN]);
// key0: the tile's first sorted key.
__device__ __forceinline__ void mask_tile(Scores& s, const int* cPos, const int* cSeq, int key0, int nk,
                                          const RowI& my_pos, const RowI& my_seq, int causal, int lane) {
#pragma unroll
    for (int nt = 0; nt < MMA_BN / 8; ++nt) {
        const int j0 = nt * 8 + (lane % 4) * 2;
        const int2 kp = *(const int2*)(cPos + j0);
        const int2 kq = *(const int2*)(cSeq + j0);
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
            const int j = j0 + e2;
            const int pk = e2 ? kp.y : kp.x, sk = e2 ? kq.y : kq.x;
            const bool in = key0 + j < nk;
#pragma unroll
            for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const bool vis = in && sk == my_seq[mt][hh] && (!causal || pk <= my_pos[mt][hh]);
                    if (!vis) s[mt][nt][2 * hh + e2] = NEG_INF;
                }
        }
    }
}

// Online softmax of slab mt over one tile, base 2 with the scale folded into the exponent's FMA:
//   m_new = max(m, max_j s_j), acc and l rescaled by 2^((m - m_new) * scale_log2),
//   p_j = 2^(s_j * scale_log2 - m_new * scale_log2), l += sum_j p_j, P -> bf16 A fragments.
// The maximum is taken on raw scores and scaled afterwards: max(s) * c = max(s * c) holds for c > 0 only,
// which is why the host refuses scale <= 0.
__device__ __forceinline__ void softmax_slab(Scores& s, Accum& acc, RowF& m, RowF& l, PFrags& pf, int mt,
                                             float scale_log2) {
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nt = 0; nt < MMA_BN / 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
    }
    float neg_ms[2], m_new[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {   // a row's 4 threads (a quad) share its maximum
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 2));
        m_new[hh] = fmaxf(m[mt][hh], mx[hh]);
        const float m_use = (m_new[hh] == NEG_INF) ? 0.f : m_new[hh];
        neg_ms[hh] = -m_use * scale_log2;
    }
    // rescale only when some row of the warp has a new maximum (unchanged: the factor is 1;
    // both -inf: acc and l are still 0)
    if (__any_sync(0xffffffffu, m_new[0] != m[mt][0] || m_new[1] != m[mt][1])) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float corr = fast_exp2(fmaf(m[mt][hh], scale_log2, neg_ms[hh]));
            l[mt][hh] *= corr;
#pragma unroll
            for (int nt = 0; nt < HEAD_DIM / 8; ++nt) {
                acc[mt][nt][2 * hh] *= corr;
                acc[mt][nt][2 * hh + 1] *= corr;
            }
        }
    }
    m[mt][0] = m_new[0];
    m[mt][1] = m_new[1];
    // P is rounded to bf16 only because the tensor cores take bf16 operands for P V. The row sum l adds
    // the unrounded fp32 p: l, and so lse = (m + log2 l) ln 2, which the exact merge across shards weighs
    // partials by, keep fp32 accuracy; the rounding of P (relative 2^-9 per weight, round to nearest)
    // stays an error of o alone, which averages over the keys (as in FlashAttention-2).
#pragma unroll
    for (int nt = 0; nt < MMA_BN / 8; ++nt) {
        const float p0 = fast_exp2(fmaf(s[mt][nt][0], scale_log2, neg_ms[0]));
        const float p1 = fast_exp2(fmaf(s[mt][nt][1], scale_log2, neg_ms[0]));
        const float p2 = fast_exp2(fmaf(s[mt][nt][2], scale_log2, neg_ms[1]));
        const float p3 = fast_exp2(fmaf(s[mt][nt][3], scale_log2, neg_ms[1]));
        l[mt][0] += p0 + p1;
        l[mt][1] += p2 + p3;
        pf[mt][nt / 2][(nt % 2) * 2 + 0] = pack_bf16(p0, p1);
        pf[mt][nt / 2][(nt % 2) * 2 + 1] = pack_bf16(p2, p3);
    }
}

// O += P V for the MMA_BN keys of cV ([MMA_BN][SMEM_ROW]).
__device__ __forceinline__ void pv_tile(Accum& acc, const PFrags& pf, const unsigned short* cV, int lane) {
#pragma unroll
    for (int ks = 0; ks < MMA_BN / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < HEAD_DIM / 16; ++np) {
            unsigned int b[4];
            ldmatrix_x4_trans(b, cV + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * SMEM_ROW
                                     + np * 16 + (lane / 16) * 8);
#pragma unroll
            for (int mt = 0; mt < MMA_MT; ++mt) {
                mma_bf16(acc[mt][2 * np], pf[mt][ks], b[0], b[1]);
                mma_bf16(acc[mt][2 * np + 1], pf[mt][ks], b[2], b[3]);
            }
        }
    }
}

// ------------------------------------------------------------------------- output
// Reduce l over the quad, normalize, write o and lse of this thread's rows to their original rows.
__device__ __forceinline__ void store_rows(const Accum& acc, const RowF& m, const RowF& l, float* o, float* lse,
                                           const int* q_idx, int first_slot, int nq, int h, int n_heads,
                                           float scale_log2, int lane) {
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float lt = l[mt][hh];
        lt += __shfl_xor_sync(0xffffffff, lt, 1);
        lt += __shfl_xor_sync(0xffffffff, lt, 2);
        const int slot = first_slot + mt * 16 + lane / 4 + 8 * hh;
        if (slot >= nq) continue;
        const int row = q_idx[slot];
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        float* op = o + ((long long)row * n_heads + h) * HEAD_DIM + (lane % 4) * 2;
#pragma unroll
        for (int nt = 0; nt < HEAD_DIM / 8; ++nt)
            *(float2*)(op + nt * 8) = make_float2(acc[mt][nt][2 * hh] * inv, acc[mt][nt][2 * hh + 1] * inv);
        if (lane % 4 == 0)
            lse[(long long)row * n_heads + h] = lt > 0.f ? (m[mt][hh] * scale_log2 + log2f(lt)) * LN2 : NEG_INF;
    }
}

// ------------------------------------------------------------------------- the kernel
// k, v here are the gathered copies (Hkv, nk_pad, D) in sorted key order (attention_order.cu: gather_kv).
// Grid: (query tiles, query heads); the block computes query tile qt of head h against all its visible
// key tiles.
extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MINB)
attn_fwd_mma(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
             const unsigned short* __restrict__ v,
             const int* __restrict__ q_idx, int nk_pad,
             const int* __restrict__ qs_pos, const int* __restrict__ qs_seq,
             const int* __restrict__ ks_pos, const int* __restrict__ ks_seq,
             const int* __restrict__ q_info, const int* __restrict__ k_info, const int* __restrict__ k_range,
             float* __restrict__ o, float* __restrict__ lse,
             int nq, int nk, int n_heads, int n_kv_heads, float scale_log2, int causal)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const Smem sm = smem_regions(smem);

    const int qt = gridDim.x - 1 - blockIdx.x;                  // late (long, causal) tiles first
    const int h = blockIdx.y;
    const int hk = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    load_q_tile(sm, q, q_idx, qt, h, nq, (long long)n_heads * HEAD_DIM, tid);

    const int4 qi = *(const int4*)(q_info + 4 * qt);
    const KeySplit share = key_split(k_range, qt, MMA_BN);
    o += share.o_offset * nq * n_heads * HEAD_DIM;
    lse += share.o_offset * nq * n_heads;
    const int kt_end = share.hi;
    const int4* k_info4 = (const int4*)k_info;
    TileScan scan;
    scan.base = -64;   // empty window: the first call fills it
    scan.vis = scan.masked = 0u;
    const unsigned short* k_head = k + (long long)hk * nk_pad * HEAD_DIM;   // (nk_pad, HEAD_DIM)
    const unsigned short* v_head = v + (long long)hk * nk_pad * HEAD_DIM;

    // Prologue: the query tile and the first MMA_STAGES - 1 visited key tiles, one commit group each
    // (the query tile rides with the first).
    Pipe pipe;
    pipe.tile[0] = next_tile(scan, share.lo, kt_end, qi, k_info4, causal, nk, lane, pipe.masked[0]);
#pragma unroll
    for (int s = 1; s < MMA_STAGES; ++s)
        pipe.tile[s] = next_tile(scan, pipe.tile[s - 1] + 1, kt_end, qi, k_info4, causal, nk, lane, pipe.masked[s]);
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {
        if (pipe.tile[s] < kt_end) load_kv_tile(sm, k_head, v_head, ks_pos, ks_seq, nk, pipe.tile[s], s, tid);
        cp_async_commit();
    }
    cp_async_wait<MMA_STAGES - 2>();
    __syncthreads();

    const int row_base = warp * 16 * MMA_MT;                   // this warp's first row in the tile
    QFrags qf;
    load_q_frags(qf, sm.q, row_base, lane);
    RowI my_pos, my_seq;
    load_row_ids(my_pos, my_seq, qs_pos, qs_seq, qt * MMA_BM + row_base, nq, lane);
    Accum acc;
    RowF m, l;
    init_rows(acc, m, l);

    int stage = 0;
    while (pipe.tile[0] < kt_end) {
        const int kt = pipe.tile[0];
        // tile kt (commit group of this iteration) has landed for this thread; after the barrier for
        // every thread, and every warp is done with the stage the next load overwrites (read last iteration)
        cp_async_wait<MMA_STAGES - 2>();
        __syncthreads();
        {
            const int ahead = pipe.tile[MMA_STAGES - 1];
            int ld_stage = stage + MMA_STAGES - 1;
            if (ld_stage >= MMA_STAGES) ld_stage -= MMA_STAGES;
            if (ahead < kt_end) load_kv_tile(sm, k_head, v_head, ks_pos, ks_seq, nk, ahead, ld_stage, tid);
            cp_async_commit();   // possibly empty: keeps one group per iteration
        }

        Scores s;
        qk_tile(s, qf, sm.q, sm.k + stage * MMA_BN * SMEM_ROW, row_base, lane);
        if (pipe.masked[0])
            mask_tile(s, sm.pos + stage * MMA_BN, sm.seq + stage * MMA_BN, kt * MMA_BN, nk, my_pos, my_seq, causal,
                      lane);
        PFrags pf;
#pragma unroll
        for (int mt = 0; mt < MMA_MT; ++mt) softmax_slab(s, acc, m, l, pf, mt, scale_log2);
        pv_tile(acc, pf, sm.v + stage * MMA_BN * SMEM_ROW, lane);

        pipe_advance(pipe, scan, kt_end, qi, k_info4, causal, nk, lane);
        stage = stage + 1 == MMA_STAGES ? 0 : stage + 1;
    }
    cp_async_wait<0>();   // no copy may outlive the block (empty groups only, by now)
    store_rows(acc, m, l, o, lse, q_idx, qt * MMA_BM + row_base, nq, h, n_heads, scale_log2, lane);
}
#endif  // ATTN_MMA
