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
// 4 warps; each warp owns MMA_MT slabs of 16 query rows (MMA_BM = 64 * MMA_MT rows per block), so every
// K/V fragment read from shared memory feeds MMA_MT matrix products. MMA_BN = 64 keys per tile, K/V
// double-buffered in shared memory with cp.async (K, V pre-gathered per head in sorted order), rows padded by 8
// elements so that ldmatrix is free of bank conflicts. Q fragments stay in registers (Q_IN_REGS) or are
// re-read from shared memory per tile (large head dims). Scores stay in registers; online softmax in
// base 2 on raw scores (the scale is folded into one FMA before ex2).
// ---------------------------------------------------------------------------------------------
#if IN_BF16 && (HEAD_DIM % 16 == 0) && (HEAD_DIM <= 256)
#ifndef MMA_MT
#define MMA_MT 1
#endif
#ifndef Q_IN_REGS
#define Q_IN_REGS 1
#endif
#define MMA_WARPS 4
#define MMA_THREADS (32 * MMA_WARPS)
#define MMA_BM (16 * MMA_MT * MMA_WARPS)
#define MMA_BN 64
#define DP (HEAD_DIM + 8)            // padded shared row, in bf16 elements
#define CH (HEAD_DIM / 8)            // 16-byte chunks per row

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

// k, v here are the gathered copies (Hkv, nk_pad, D) in sorted key order (attention_order.cu: gather_kv).
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
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
    unsigned short* sK = sQ + MMA_BM * DP;                      // [2][MMA_BN][DP]
    unsigned short* sV = sK + 2 * MMA_BN * DP;                  // [2][MMA_BN][DP]
    int* sPos = (int*)(sV + 2 * MMA_BN * DP);                   // [2][MMA_BN]
    int* sSeq = sPos + 2 * MMA_BN;                              // [2][MMA_BN]

    const int qt = gridDim.x - 1 - blockIdx.x;                  // late (long, causal) tiles first
    const int h = blockIdx.y;
    const int hk = h / (n_heads / n_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const long long q_row_stride = (long long)n_heads * HEAD_DIM;

    // Query tile -> shared memory (zeros past nq).
    for (int c = tid; c < MMA_BM * CH; c += MMA_THREADS) {
        const int rr = c / CH, ch = c % CH, slot = qt * MMA_BM + rr;
        const bool in = slot < nq;
        const unsigned short* src = q + (in ? q_idx[slot] * q_row_stride + h * HEAD_DIM + ch * 8 : 0);
        cp_async16(sQ + rr * DP + ch * 8, src, in);
    }
    cp_async_commit();

    const int4 qi = *(const int4*)(q_info + 4 * qt);
    const int lo = k_range[2 * qt], hi = k_range[2 * qt + 1];
    const int kt_end = (hi + MMA_BN - 1) / MMA_BN;
    const int4* k_info4 = (const int4*)k_info;
    int kt = lo / MMA_BN;
    while (kt < kt_end && tile_kind4(qi, k_info4[kt], causal, (kt + 1) * MMA_BN <= nk) == 0) ++kt;

    // one key tile of head hk: a contiguous (MMA_BN, HEAD_DIM) block of the gathered K and V; no
    // dependent global loads before the copies are issued
    const unsigned short* k_head = k + (long long)hk * nk_pad * HEAD_DIM;
    const unsigned short* v_head = v + (long long)hk * nk_pad * HEAD_DIM;
    auto load_kv = [&](int tile, int stage) {
        const int base = tile * MMA_BN;
        unsigned short* dk = sK + stage * MMA_BN * DP;
        unsigned short* dv = sV + stage * MMA_BN * DP;
        const unsigned short* src_k = k_head + (long long)base * HEAD_DIM;
        const unsigned short* src_v = v_head + (long long)base * HEAD_DIM;
#pragma unroll
        for (int c = tid; c < MMA_BN * CH; c += MMA_THREADS) {
            const int j = c / CH, ch = c % CH;
            cp_async16(dk + j * DP + ch * 8, src_k + c * 8, true);
            cp_async16(dv + j * DP + ch * 8, src_v + c * 8, true);
        }
        if (tid < MMA_BN) {
            const bool in = base + tid < nk;
            cp_async4(sPos + stage * MMA_BN + tid, ks_pos + (in ? base + tid : 0), in);
        } else if (tid < 2 * MMA_BN) {
            const int t = tid - MMA_BN;
            const bool in = base + t < nk;
            cp_async4(sSeq + stage * MMA_BN + t, ks_seq + (in ? base + t : 0), in);
        }
        cp_async_commit();
    };

    if (kt < kt_end) load_kv(kt, 0);
    cp_async_wait<0>();
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
    while (kt < kt_end) {
        const int kind = tile_kind4(qi, k_info4[kt], causal, (kt + 1) * MMA_BN <= nk);
        int nxt = kt + 1;
        while (nxt < kt_end && tile_kind4(qi, k_info4[nxt], causal, (nxt + 1) * MMA_BN <= nk) == 0) ++nxt;
        if (nxt < kt_end) {
            load_kv(nxt, stage ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

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

        // mask, online softmax (base 2; the scale folded into the exponent's FMA)
        const int* cPos = sPos + stage * MMA_BN;
        const int* cSeq = sSeq + stage * MMA_BN;
        unsigned int pf[MMA_MT][MMA_BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MMA_MT; ++mt) {
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < MMA_BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int hh = e / 2;
                    float x = s[mt][nt][e];
                    if (kind == 2) {
                        const int j = nt * 8 + (lane % 4) * 2 + (e % 2);
                        const bool vis = (kt * MMA_BN + j < nk) && cSeq[j] == my_seq[mt][hh] &&
                                         (!causal || cPos[j] <= my_pos[mt][hh]);
                        x = vis ? x : NEG_INF;
                        s[mt][nt][e] = x;
                    }
                    mx[hh] = fmaxf(mx[hh], x);
                }
            }
            float neg_ms[2];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 1));
                mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 2));
                const float m_new = fmaxf(m[mt][hh], mx[hh]);
                const float m_use = (m_new == NEG_INF) ? 0.f : m_new;
                const float corr = fast_exp2((m[mt][hh] - m_use) * scale_log2);
                l[mt][hh] *= corr;
#pragma unroll
                for (int nt = 0; nt < HEAD_DIM / 8; ++nt) {
                    acc[mt][nt][2 * hh] *= corr;
                    acc[mt][nt][2 * hh + 1] *= corr;
                }
                m[mt][hh] = m_new;
                neg_ms[hh] = -m_use * scale_log2;
            }
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
        __syncthreads();   // this stage is overwritten by the load two tiles on
        stage ^= 1;
        kt = nxt;
    }

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
