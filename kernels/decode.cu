// An AttnNode's layer of a small step (decode), fused (architecture.md §7): two launches a layer in place of the
// unpack, sort, tile, attend, merge and pack chain (rshard_hpc/ops/decode_cuda.py).
//   decode_append: the step's new k, v rows, read from the receive buffer, written into the layer's cache rows.
//   decode_attend: per (query row, head), a block of warps: partial attention of q (read from the receive
//                  buffer) over every cached key row of the layer visible to it (same sequence; pos_k <= pos_q when
//                  causal), written as the packed partial the CompNode merges: D values of o then lse (one float32,
//                  or under bf16 D bf16 bits then the float32 lse's two uint16 halves, low half first;
//                  precision.pack_partial).
// Larger steps (ops/decode_cuda.PlanLayers) attend through partial_attention.cu but unpack with unpack_rows (the
// q gather and decode_append's rows in one launch) and pack with pack_partial (at the end of this file).
// Arithmetic as kernels/partial_attention.cu's CUDA-core kernel: fp32, scores in the log2 domain
// (scale_log2 = scale * log2 e), online softmax with exp2f, lse = (m + log2 l) * ln 2, no visible key: (0, -inf).
// Loaded after kernels/common.cuh (NEG_INF, LN2, wire_value, bf16_bits).

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined by the host (rshard_hpc/ops/decode_cuda.py)"
#endif
#ifndef WIRE_BF16
#error "WIRE_BF16 must be defined by the host (rshard_hpc/ops/decode_cuda.py)"
#endif
#ifndef DECODE_THREADS
#error "DECODE_THREADS must be defined by the host (rshard_hpc/ops/decode_cuda.py)"
#endif
#ifndef BF16_NAN
#error "BF16_NAN must be defined by the host (rshard_hpc/ops/decode_cuda.py)"
#endif
#if DECODE_THREADS % 32 || DECODE_THREADS > 1024
#error "DECODE_THREADS must be a multiple of 32, at most 1024"
#endif

#if WIRE_BF16
typedef unsigned short wire_t;  // common.cuh: wire_value, bf16_bits
#else
typedef float wire_t;
#endif

// Element idx < n_new * row_width of the append: k_cache, v_cache are the layer's (capacity, Hkv, D) rows; row
// first + m gets the new row m, whose k starts at recv[k_src[m]] and v at recv[v_src[m]] (Hkv * D elements each).
__device__ __forceinline__ void append_element(const wire_t* __restrict__ recv, const long long* __restrict__ k_src,
                                               const long long* __restrict__ v_src, wire_t* __restrict__ k_cache,
                                               wire_t* __restrict__ v_cache, int first, int row_width, long long idx)
{
    const int m = (int)(idx / row_width), e = (int)(idx % row_width);
    const long long at = (long long)(first + m) * row_width + e;
    k_cache[at] = recv[k_src[m] + e];
    v_cache[at] = recv[v_src[m] + e];
}

// Element idx < n_q * row_width of the q gather: query row r's q (row_width = H * D elements at recv[q_src[r]])
// into q (n_q, H, D), contiguous.
__device__ __forceinline__ void gather_q_element(const wire_t* __restrict__ recv, const long long* __restrict__ q_src,
                                                 wire_t* __restrict__ q, int row_width, long long idx)
{
    const int r = (int)(idx / row_width), e = (int)(idx % row_width);
    q[idx] = recv[q_src[r] + e];
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
decode_append(const wire_t* __restrict__ recv, const long long* __restrict__ k_src,
              const long long* __restrict__ v_src, wire_t* __restrict__ k_cache, wire_t* __restrict__ v_cache,
              int n_new, int first, int row_width)
{
    const long long total = (long long)n_new * row_width;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x)
        append_element(recv, k_src, v_src, k_cache, v_cache, first, row_width, idx);
}

// unpack_rows: PlanLayers' unpack of a layer's receive buffer in one launch, gather_q's elements then
// decode_append's (q_width = H * D, row_width = Hkv * D).
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
unpack_rows(const wire_t* __restrict__ recv, const long long* __restrict__ q_src, wire_t* __restrict__ q, int n_q,
            int q_width, const long long* __restrict__ k_src, const long long* __restrict__ v_src,
            wire_t* __restrict__ k_cache, wire_t* __restrict__ v_cache, int n_new, int first, int row_width)
{
    const long long q_total = (long long)n_q * q_width;
    const long long total = q_total + (long long)n_new * row_width;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        if (idx < q_total)
            gather_q_element(recv, q_src, q, q_width, idx);
        else
            append_element(recv, k_src, v_src, k_cache, v_cache, first, row_width, idx - q_total);
    }
}

// Grid (n_q, H, S), DECODE_THREADS threads. Query row r's q (H, D) starts at recv[q_src[r]]; keys 0 … n_keys-1 of
// the layer's cache (k_pos, k_seq per row). out: (n_q, H, slots) wire elements.
// Each warp takes keys warp, warp + warps, …: its 32 lanes read a key row together (lane l holds dims l, l + 32, …),
// the score is a shuffle sum, and every lane keeps the warp's online softmax (m, l) and its dims of o; the warps'
// results are then merged exactly through shared memory.
// Key split (flash-decoding, for few queries): with S = gridDim.z > 1 block z takes the z-th of S contiguous runs
// of keys, writes its unnormalized share (m, l, acc) to part_ml (S, n_q, H, 2) and part_o (S, n_q, H, D), and the
// last block of (r, h) to finish (counters[r * H + h], zero before the launch and reset to zero by that block)
// merges the S shares exactly and writes the output.
#define DECODE_DPL ((HEAD_DIM + 31) / 32)  // dims a lane holds
#define DECODE_WARPS (DECODE_THREADS / 32)
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
decode_attend(const wire_t* __restrict__ recv, const long long* __restrict__ q_src, const int* __restrict__ q_pos,
              const int* __restrict__ q_seq, const wire_t* __restrict__ k_cache, const wire_t* __restrict__ v_cache,
              const int* __restrict__ k_pos, const int* __restrict__ k_seq, wire_t* __restrict__ out,
              float* __restrict__ part_o, float* __restrict__ part_ml, int* __restrict__ counters,
              int n_keys, int n_heads, int n_kv, int slots, float scale_log2, int causal)
{
    __shared__ float m_s[DECODE_WARPS], l_s[DECODE_WARPS];
    __shared__ float acc_s[DECODE_WARPS][HEAD_DIM];
    __shared__ int last_block;
    const int r = blockIdx.x, h = blockIdx.y, z = blockIdx.z, S = gridDim.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n_q = gridDim.x;
    const int kv_head = h / (n_heads / n_kv);
    const long long q_at = q_src[r] + (long long)h * HEAD_DIM;
    float qv[DECODE_DPL], acc[DECODE_DPL];
#pragma unroll
    for (int i = 0; i < DECODE_DPL; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < HEAD_DIM ? wire_value(recv[q_at + d]) : 0.f;
        acc[i] = 0.f;
    }
    const int qp = q_pos[r], qs = q_seq[r];
    const int row_width = n_kv * HEAD_DIM;
    const int chunk = (n_keys + S - 1) / S;
    const int lo = min(n_keys, z * chunk), hi = min(n_keys, lo + chunk);
    float m = NEG_INF, l = 0.f;
    for (int j = lo + warp; j < hi; j += DECODE_WARPS) {
        if (k_seq[j] != qs || (causal && k_pos[j] > qp)) continue;  // the same j on every lane: no divergence
        const wire_t* kr = k_cache + (long long)j * row_width + kv_head * HEAD_DIM;
        const wire_t* vr = v_cache + (long long)j * row_width + kv_head * HEAD_DIM;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < DECODE_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < HEAD_DIM) s = fmaf(qv[i], wire_value(kr[d]), s);
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s *= scale_log2;
        const float m_new = fmaxf(m, s);
        const float keep = exp2f(m - m_new), p = exp2f(s - m_new);
        l = l * keep + p;
#pragma unroll
        for (int i = 0; i < DECODE_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < HEAD_DIM) acc[i] = fmaf(p, wire_value(vr[d]), acc[i] * keep);
        }
        m = m_new;
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DECODE_DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < HEAD_DIM) acc_s[warp][d] = acc[i];
    }
    __syncthreads();
    // this block's share: top (max of the warps' m), total l and acc, both scaled to top (unnormalized)
    float top = NEG_INF;
    for (int w = 0; w < DECODE_WARPS; ++w) top = fmaxf(top, m_s[w]);
    float total_l = 0.f;
    for (int w = 0; w < DECODE_WARPS; ++w)
        if (m_s[w] != NEG_INF) total_l += l_s[w] * exp2f(m_s[w] - top);
    if (S > 1) {
        const long long share = ((long long)z * n_q + r) * n_heads + h;
        for (int d = tid; d < HEAD_DIM; d += DECODE_THREADS) {
            float a = 0.f;
            for (int w = 0; w < DECODE_WARPS; ++w)
                if (m_s[w] != NEG_INF) a = fmaf(acc_s[w][d], exp2f(m_s[w] - top), a);
            part_o[share * HEAD_DIM + d] = a;
        }
        if (tid == 0) {
            part_ml[2 * share] = top;
            part_ml[2 * share + 1] = total_l;
        }
        __threadfence();  // this block's share is visible to the block that merges
        __syncthreads();
        if (tid == 0) last_block = atomicAdd(&counters[r * n_heads + h], 1) == S - 1;
        __syncthreads();
        if (!last_block) return;
        __threadfence();
        // the last block: every share's (m, l) into this block's shared arrays (S may exceed the warps: loop)
        top = NEG_INF;
        for (int y = 0; y < S; ++y) top = fmaxf(top, __ldcg(&part_ml[2 * (((long long)y * n_q + r) * n_heads + h)]));
        total_l = 0.f;
        for (int y = 0; y < S; ++y) {
            const long long sh = ((long long)y * n_q + r) * n_heads + h;
            const float my = __ldcg(&part_ml[2 * sh]);
            if (my != NEG_INF) total_l += __ldcg(&part_ml[2 * sh + 1]) * exp2f(my - top);
        }
    }
    const bool seen = top != NEG_INF && total_l > 0.f;
    const float inv = seen ? 1.f / total_l : 0.f;
    wire_t* o = out + ((long long)r * n_heads + h) * slots;
    for (int d = tid; d < HEAD_DIM; d += DECODE_THREADS) {
        float a = 0.f;
        if (S > 1) {
            for (int y = 0; y < S; ++y) {
                const long long sh = ((long long)y * n_q + r) * n_heads + h;
                const float my = __ldcg(&part_ml[2 * sh]);
                if (my != NEG_INF) a = fmaf(__ldcg(&part_o[sh * HEAD_DIM + d]), exp2f(my - top), a);
            }
        } else {
            for (int w = 0; w < DECODE_WARPS; ++w)
                if (m_s[w] != NEG_INF) a = fmaf(acc_s[w][d], exp2f(m_s[w] - top), a);
        }
#if WIRE_BF16
        o[d] = bf16_bits(a * inv);
#else
        o[d] = a * inv;
#endif
    }
    if (tid == 0) {
        const float lse = seen ? (top + log2f(total_l)) * LN2 : NEG_INF;
#if WIRE_BF16
        const unsigned int bits = __float_as_uint(lse);
        o[HEAD_DIM] = (unsigned short)(bits & 0xFFFFu);
        o[HEAD_DIM + 1] = (unsigned short)(bits >> 16);
#else
        o[HEAD_DIM] = lse;
#endif
        if (S > 1) counters[r * n_heads + h] = 0;  // ready for the next launch
    }
}

// The pack of an AttnNode's layer of a larger step (ops/decode_cuda.PlanLayers), which attends through the general
// plan (kernels/partial_attention.cu) and unpacks with unpack_rows (above, beside decode_append).

// pack_partial: o (n, D) and lse (n,) float32, n = rows * heads, into out (n, slots) wire elements, as
// decode_attend writes a partial (and ops/precision.pack_partial): D values of o (bf16: rounded), then lse
// (bf16 wire: its two uint16 halves, low half first).
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
pack_partial(const float* __restrict__ o, const float* __restrict__ lse, wire_t* __restrict__ out, int n,
             int slots)
{
    const long long total = (long long)n * slots;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long rh = idx / slots;
        const int s = (int)(idx % slots);
#if WIRE_BF16
        if (s < HEAD_DIM) {
            out[idx] = bf16_bits(o[rh * HEAD_DIM + s]);
        } else {
            const unsigned int bits = __float_as_uint(lse[rh]);
            out[idx] = (unsigned short)(s == HEAD_DIM ? (bits & 0xFFFFu) : (bits >> 16));
        }
#else
        out[idx] = s < HEAD_DIM ? o[rh * HEAD_DIM + s] : lse[rh];
#endif
    }
}
