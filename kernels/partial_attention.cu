// Partial attention for ragged batches with a positions-based mask (DESIGN §1, §7).
//
// Loaded as text by rshard_hpc/attention_gpu.py, which prepends a preamble defining
//   HEAD_DIM  the head dimension D
//   IN_BF16   1: q, k, v are bf16 bit patterns (unsigned short); 0: float32
// and compiles it with NVRTC for the running GPU.
//
// Rows are visited in an order sorted by (sequence, position), given by q_idx / k_idx (sorted slot ->
// original row); outputs are written back to the original rows. The tensor-core kernel takes K and V
// already gathered into that order, per KV head (kernels/attention_order.cu: gather_kv), and nk_pad in
// place of k_idx. Per tile the host gives
//   q_info[t] = {seq_min, seq_max, pos_min, pos_max} of query tile t (sorted order),
//   k_info[t] = the same for key tile t (tiles of the kernel's key-tile size, aligned to 0),
//   k_range[t] = {lo, hi}: the sorted keys that any query of tile t may see lie in [lo, hi).
// A key tile is skipped when no key of it can be visible, and computed without a mask when every
// key is visible to every query of the tile. Visible: same sequence and, when causal, pos_k <= pos_q.
// Output: o (nq, Hq, D) float32, lse (nq, Hq) float32 (natural log); a row with no visible key gets
// o = 0, lse = -inf.

#define NEG_INF __int_as_float(0xff800000)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

#if IN_BF16
typedef unsigned short in_t;
__device__ __forceinline__ float load_in(const in_t* p) { return bf16_to_float(*p); }
#else
typedef float in_t;
__device__ __forceinline__ float load_in(const in_t* p) { return *p; }
#endif

// 0: skip the tile, 1: every pair visible (no mask), 2: mask element by element.
__device__ __forceinline__ int tile_kind(const int* qi, const int* ki, int causal, int full_tile) {
    if (ki[1] < qi[0] || ki[0] > qi[1]) return 0;          // no common sequence
    if (causal && ki[2] > qi[3]) return 0;                  // every key after every query
    if (full_tile && qi[0] == qi[1] && ki[0] == ki[1] && qi[0] == ki[0] && (!causal || ki[3] <= qi[2]))
        return 1;
    return 2;
}

// ---------------------------------------------------------------------------------------------
// Simple kernel (CUDA cores, fp32 math): any HEAD_DIM, fp32 or bf16 inputs.
// TPR threads share one query row, each holding DPT = HEAD_DIM / TPR dimensions of q and of the
// output accumulator. SIMT_BM query rows (sorted order) per block, SIMT_BN keys per shared tile.
// ---------------------------------------------------------------------------------------------
#ifndef SIMT_TPR
#define SIMT_TPR 1
#endif
#define SIMT_THREADS 128
#define SIMT_BM (SIMT_THREADS / SIMT_TPR)
#define SIMT_BN (HEAD_DIM > 128 ? 16 : 32)
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

    const int* qi = q_info + 4 * qt;
    const int lo = k_range[2 * qt], hi = k_range[2 * qt + 1];
    for (int kt = lo / SIMT_BN; kt * SIMT_BN < hi; ++kt) {
        const int base = kt * SIMT_BN;
        const int kind = tile_kind(qi, k_info + 4 * kt, causal, base + SIMT_BN <= nk);
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

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 mma.sync m16n8k16, fp32 accumulate): bf16 inputs, HEAD_DIM % 16 == 0.
// MMA_WARPS warps; each warp owns MMA_MT slabs of 16 query rows (MMA_BM = 16 * MMA_MT * MMA_WARPS rows
// per block), so every K/V fragment read from shared memory feeds MMA_MT matrix products, and every K/V
// tile brought into shared memory serves MMA_BM query rows. MMA_BN keys per tile, K/V in MMA_STAGES
// shared-memory stages filled by cp.async MMA_STAGES - 1 tiles ahead (K, V pre-gathered per head in sorted
// order), one barrier per tile; rows padded by 8 elements so that ldmatrix is free of bank conflicts.
// Q fragments stay in registers (Q_IN_REGS) or are re-read from shared memory per tile (large head dims).
// Scores stay in registers; online softmax in base 2 on raw scores (the scale is folded into one FMA
// before ex2); the accumulator is rescaled only when some row's running maximum moved (warp vote).
// Which key tiles to visit (and which need the element mask) is decided 32 tiles at a time by a warp
// vote over the tile summaries, so no global load sits between one tile and the next.
// Configuration (host: attention_gpu.MmaConfig): MMA_MT, Q_IN_REGS, MMA_WARPS, MMA_BN, MMA_STAGES,
// MMA_MINB (blocks per SM the register allocation must allow: __launch_bounds__'s second argument).
// ---------------------------------------------------------------------------------------------
#if IN_BF16 && (HEAD_DIM % 16 == 0) && (HEAD_DIM <= 256)
#ifndef MMA_MT
#define MMA_MT 1
#endif
#ifndef Q_IN_REGS
#define Q_IN_REGS 1
#endif
#ifndef MMA_WARPS
#define MMA_WARPS 4
#endif
#ifndef MMA_BN
#define MMA_BN 64
#endif
#ifndef MMA_STAGES
#define MMA_STAGES 2
#endif
#ifndef MMA_MINB
#define MMA_MINB 1
#endif
#define MMA_THREADS (32 * MMA_WARPS)
#define MMA_BM (16 * MMA_MT * MMA_WARPS)
#define DP (HEAD_DIM + 8)            // padded shared row, in bf16 elements
#define CH (HEAD_DIM / 8)            // 16-byte chunks per row
#if MMA_STAGES < 2 || MMA_BN % 16 || MMA_BN > 128
#error "MMA_STAGES >= 2 and MMA_BN in {16, 32, ..., 128} required"
#endif

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

__device__ __forceinline__ int tile_kind4(int4 qi, int4 ki, int causal, int full_tile) {
    if (ki.y < qi.x || ki.x > qi.y) return 0;
    if (causal && ki.z > qi.w) return 0;
    if (full_tile && qi.x == qi.y && ki.x == ki.y && qi.x == ki.x && (!causal || ki.w <= qi.z)) return 1;
    return 2;
}

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
            const int kd = tt < kt_end ? tile_kind4(qi, __ldg(k_info4 + tt), causal, (tt + 1) * MMA_BN <= nk) : 0;
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

// k, v here are the gathered copies (Hkv, nk_pad, D) in sorted key order (attention_order.cu: gather_kv).
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
    unsigned short* sQ = (unsigned short*)smem;                 // [MMA_BM][DP]
    unsigned short* sK = sQ + MMA_BM * DP;                      // [MMA_STAGES][MMA_BN][DP]
    unsigned short* sV = sK + MMA_STAGES * MMA_BN * DP;         // [MMA_STAGES][MMA_BN][DP]
    int* sPos = (int*)(sV + MMA_STAGES * MMA_BN * DP);          // [MMA_STAGES][MMA_BN]
    int* sSeq = sPos + MMA_STAGES * MMA_BN;                     // [MMA_STAGES][MMA_BN]

    const int qt = gridDim.x - 1 - blockIdx.x;                  // late (long, causal) tiles first
    const int h = blockIdx.y;
    const int hk = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const long long q_row_stride = (long long)n_heads * HEAD_DIM;

    // Query tile -> shared memory (zeros past nq).
#pragma unroll
    for (int i = 0; i < (MMA_BM * CH + MMA_THREADS - 1) / MMA_THREADS; ++i) {
        const int c = tid + i * MMA_THREADS;
        if ((MMA_BM * CH) % MMA_THREADS == 0 || c < MMA_BM * CH) {
            const int rr = c / CH, ch = c % CH, slot = qt * MMA_BM + rr;
            const bool in = slot < nq;
            const unsigned short* src = q + (in ? q_idx[slot] * q_row_stride + h * HEAD_DIM + ch * 8 : 0);
            cp_async16(sQ + rr * DP + ch * 8, src, in);
        }
    }

    const int4 qi = *(const int4*)(q_info + 4 * qt);
    const int lo = k_range[2 * qt], hi = k_range[2 * qt + 1];
    const int kt_end = (hi + MMA_BN - 1) / MMA_BN;
    const int4* k_info4 = (const int4*)k_info;
    TileScan scan;
    scan.base = -64;   // empty window: the first call fills it
    scan.vis = scan.masked = 0u;

    // one key tile of head hk: a contiguous (MMA_BN, HEAD_DIM) block of the gathered K and V
    const unsigned short* k_head = k + (long long)hk * nk_pad * HEAD_DIM;
    const unsigned short* v_head = v + (long long)hk * nk_pad * HEAD_DIM;
    auto load_kv = [&](int tile, int stage) {
        const int base = tile * MMA_BN;
        unsigned short* dk = sK + stage * MMA_BN * DP;
        unsigned short* dv = sV + stage * MMA_BN * DP;
        const unsigned short* src_k = k_head + (long long)base * HEAD_DIM;
        const unsigned short* src_v = v_head + (long long)base * HEAD_DIM;
#pragma unroll
        for (int i = 0; i < (MMA_BN * CH + MMA_THREADS - 1) / MMA_THREADS; ++i) {
            const int c = tid + i * MMA_THREADS;
            if ((MMA_BN * CH) % MMA_THREADS == 0 || c < MMA_BN * CH) {
                const int j = c / CH, ch = c % CH;
                cp_async16(dk + j * DP + ch * 8, src_k + c * 8, true);
                cp_async16(dv + j * DP + ch * 8, src_v + c * 8, true);
            }
        }
#pragma unroll
        for (int i = 0; i < (2 * MMA_BN + MMA_THREADS - 1) / MMA_THREADS; ++i) {
            const int c = tid + i * MMA_THREADS;
            if (c < MMA_BN) {
                const bool in = base + c < nk;
                cp_async4(sPos + stage * MMA_BN + c, ks_pos + (in ? base + c : 0), in);
            } else if (c < 2 * MMA_BN) {
                const int t = c - MMA_BN;
                const bool in = base + t < nk;
                cp_async4(sSeq + stage * MMA_BN + t, ks_seq + (in ? base + t : 0), in);
            }
        }
    };

    // Prologue: the query tile and the first MMA_STAGES - 1 visited key tiles, one commit group each
    // (the query tile rides with the first); pipe[] holds the visited tiles in flight, in order.
    int pipe[MMA_STAGES], pipe_masked[MMA_STAGES];
    pipe[0] = next_tile(scan, lo / MMA_BN, kt_end, qi, k_info4, causal, nk, lane, pipe_masked[0]);
#pragma unroll
    for (int s = 1; s < MMA_STAGES; ++s)
        pipe[s] = next_tile(scan, pipe[s - 1] + 1, kt_end, qi, k_info4, causal, nk, lane, pipe_masked[s]);
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {
        if (pipe[s] < kt_end) load_kv(pipe[s], s);
        cp_async_commit();
    }
    cp_async_wait<MMA_STAGES - 2>();
    __syncthreads();

    const int row_base = warp * 16 * MMA_MT;                   // this warp's first row in the tile
#if Q_IN_REGS
    unsigned int qf[MMA_MT][HEAD_DIM / 16][4];
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks)
            ldmatrix_x4(qf[mt][ks], sQ + (row_base + mt * 16 + (lane % 16)) * DP + ks * 16 + (lane / 16) * 8);
#endif

    // This thread's rows (sorted slots): lane/4 and lane/4 + 8 of each 16-row slab.
    int my_pos[MMA_MT][2], my_seq[MMA_MT][2];
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int slot = qt * MMA_BM + row_base + mt * 16 + lane / 4 + 8 * hh;
            my_pos[mt][hh] = slot < nq ? qs_pos[slot] : 0;
            my_seq[mt][hh] = slot < nq ? qs_seq[slot] : -1;
        }

    float acc[MMA_MT][HEAD_DIM / 8][4];
    float m[MMA_MT][2], l[MMA_MT][2];
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < HEAD_DIM / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    int stage = 0;
    while (pipe[0] < kt_end) {
        const int kt = pipe[0];
        const int kind_masked = pipe_masked[0];
        // tile kt (commit group of this iteration) has landed for this thread; after the barrier for
        // every thread, and every warp is done with the stage the next load overwrites (read last iteration)
        cp_async_wait<MMA_STAGES - 2>();
        __syncthreads();
        {
            const int ahead = pipe[MMA_STAGES - 1];
            int ld_stage = stage + MMA_STAGES - 1;
            if (ld_stage >= MMA_STAGES) ld_stage -= MMA_STAGES;
            if (ahead < kt_end) load_kv(ahead, ld_stage);
            cp_async_commit();   // possibly empty: keeps one group per iteration
        }

        const unsigned short* cK = sK + stage * MMA_BN * DP;
        const unsigned short* cV = sV + stage * MMA_BN * DP;

        // S = Q K^T (16*MMA_MT x MMA_BN per warp), raw (unscaled) scores
        float s[MMA_MT][MMA_BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < MMA_BN / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
#if Q_IN_REGS
#define QF(mt) qf[mt][ks]
#else
            unsigned int qa[MMA_MT][4];
#pragma unroll
            for (int mt = 0; mt < MMA_MT; ++mt)
                ldmatrix_x4(qa[mt], sQ + (row_base + mt * 16 + (lane % 16)) * DP + ks * 16 + (lane / 16) * 8);
#define QF(mt) qa[mt]
#endif
#pragma unroll
            for (int np = 0; np < MMA_BN / 16; ++np) {
                unsigned int b[4];
                ldmatrix_x4(b, cK + (np * 16 + (lane % 8) + (lane / 16) * 8) * DP + ks * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
                for (int mt = 0; mt < MMA_MT; ++mt) {
                    mma_bf16(s[mt][2 * np], QF(mt), b[0], b[1]);
                    mma_bf16(s[mt][2 * np + 1], QF(mt), b[2], b[3]);
                }
            }
#undef QF
        }

        // mask (only tiles that need it), online softmax (base 2; the scale folded into the exponent's FMA)
        if (kind_masked) {
            const int* cPos = sPos + stage * MMA_BN;
            const int* cSeq = sSeq + stage * MMA_BN;
#pragma unroll
            for (int nt = 0; nt < MMA_BN / 8; ++nt) {
                const int j0 = nt * 8 + (lane % 4) * 2;
                const int2 kp = *(const int2*)(cPos + j0);
                const int2 kq = *(const int2*)(cSeq + j0);
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    const int j = j0 + e2;
                    const int pk = e2 ? kp.y : kp.x, sk = e2 ? kq.y : kq.x;
                    const bool in = kt * MMA_BN + j < nk;
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
        unsigned int pf[MMA_MT][MMA_BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MMA_MT; ++mt) {
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < MMA_BN / 8; ++nt) {
                mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            float neg_ms[2], m_new[2];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
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

        // O += P V
#pragma unroll
        for (int ks = 0; ks < MMA_BN / 16; ++ks) {
#pragma unroll
            for (int np = 0; np < HEAD_DIM / 16; ++np) {
                unsigned int b[4];
                ldmatrix_x4_trans(b, cV + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * DP
                                         + np * 16 + (lane / 16) * 8);
#pragma unroll
                for (int mt = 0; mt < MMA_MT; ++mt) {
                    mma_bf16(acc[mt][2 * np], pf[mt][ks], b[0], b[1]);
                    mma_bf16(acc[mt][2 * np + 1], pf[mt][ks], b[2], b[3]);
                }
            }
        }
        // The tile after the ones in flight (uniform work; a global load once per 32 tiles).
#pragma unroll
        for (int p = 0; p < MMA_STAGES - 1; ++p) {
            pipe[p] = pipe[p + 1];
            pipe_masked[p] = pipe_masked[p + 1];
        }
        pipe[MMA_STAGES - 1] = next_tile(scan, pipe[MMA_STAGES - 2] + 1, kt_end, qi, k_info4, causal, nk, lane,
                                         pipe_masked[MMA_STAGES - 1]);

        stage = stage + 1 == MMA_STAGES ? 0 : stage + 1;
    }
    cp_async_wait<0>();   // no copy may outlive the block (empty groups only, by now)

    // Finish: reduce l over the quad, normalize, write to the original rows.
#pragma unroll
    for (int mt = 0; mt < MMA_MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        float lt = l[mt][hh];
        lt += __shfl_xor_sync(0xffffffff, lt, 1);
        lt += __shfl_xor_sync(0xffffffff, lt, 2);
        const int slot = qt * MMA_BM + row_base + mt * 16 + lane / 4 + 8 * hh;
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
#endif
