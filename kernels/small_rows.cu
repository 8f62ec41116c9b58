// A Llama CompNode's layer for a step of a few rows (a decode step's new tokens), in four launches with no
// cuBLAS call (architecture.md §7, issue 13). At a few rows every matrix product is a matrix-vector product
// bound by launches, not by arithmetic; these kernels put the norm before a product, and RoPE, SiLU * up or
// the residual add after it, into the product's launch:
//   norm_rope   RMSNorm(h) -> q/k/v product -> RoPE on the q and k heads    (Llama.pre)
//   linear_rows x @ W^T (+ residual)                                        (Llama.post: O, down)
//   norm_silu   RMSNorm(h) -> gate/up product -> silu(gate) * up            (Llama.post)
// Loaded by rshard_hpc/ops/small_rows_cuda.py after kernels/common.cuh (block_sum, bf16_bits, wire_value).
//
// Work: one warp per output column (linear_rows) or column pair (the others), warps striding over the
// columns; each lane holds SMALL_ROWS rows' partial sums over its share of the input dimension (rows beyond
// SMALL_ROWS in further passes), then the warp adds them up. Weights are float32, or bf16 bit patterns
// (uint16) whose products take bf16-rounded inputs (ops/precision.py: bf16 inputs, fp32 accumulation).
// Numerics: the normed input is rms_norm_rows' value bit for bit (the same row sums, passes.cu), RoPE and
// SiLU * up are passes.cu's arithmetic; the products sum in another order than cuBLAS (fp32 rounding).

#ifndef PASS_THREADS
#error "PASS_THREADS must be defined by the host (rshard_hpc small-rows launch layer)"
#endif
#ifndef BF16_NAN
#error "BF16_NAN must be defined by the host (rshard_hpc small-rows launch layer)"
#endif
#ifndef SMALL_ROWS
#error "SMALL_ROWS must be defined by the host (rshard_hpc small-rows launch layer)"
#endif

#define WARPS (PASS_THREADS / 32)

// A product's operand: the input value itself (float32 weights) or rounded to bf16 (bf16 weights).
__device__ __forceinline__ float operand(const float*, float v) { return v; }
__device__ __forceinline__ float operand(const unsigned short*, float v) { return wire_value(bf16_bits(v)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}

// scale[r] = 1 / sqrt(mean(x_r * x_r) + eps) for rows r < nr of x (rows of d): rms_norm_rows' scale bit for bit.
__device__ __forceinline__ void row_scales(const float* __restrict__ x, int d, int nr, float eps, float* red,
                                           float* scale)
{
    for (int r = 0; r < nr; ++r) {
        float acc = 0.f;
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) {
            const float v = x[(long long)r * d + j];
            acc = __fadd_rn(acc, __fmul_rn(v, v));
        }
        const float mean = __fdiv_rn(block_sum(acc, red), (float)d);
        if (threadIdx.x == 0) scale[r] = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
}

// acc[c][r] = sum over j < d of x(r, j) * w_c[j], for NC weight rows w_c and the rows r < nr; every lane of the
// warp returns the sums. valid == false (a warp past the last column): no loads, zeros (the warp still joins
// the shuffles, as every warp of the block does).
template <int NC, class W, class X>
__device__ __forceinline__ void warp_dots(const W* const (&w)[NC], X x, int nr, int d, bool valid,
                                          float (&acc)[NC][SMALL_ROWS])
{
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int r = 0; r < SMALL_ROWS; ++r) acc[c][r] = 0.f;
    if (valid) {
        for (int j = threadIdx.x % 32; j < d; j += 32) {
            float wv[NC];
#pragma unroll
            for (int c = 0; c < NC; ++c) wv[c] = wire_value(w[c][j]);
#pragma unroll
            for (int r = 0; r < SMALL_ROWS; ++r) {
                if (r < nr) {
                    const float xv = x(r, j);
#pragma unroll
                    for (int c = 0; c < NC; ++c) acc[c][r] = fmaf(xv, wv[c], acc[c][r]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int r = 0; r < SMALL_ROWS; ++r) acc[c][r] = warp_sum(acc[c][r]);
}

// Two weight rows (output columns) whose products one warp computes together.
struct ColPair { long long a, b; };

// RMSNorm(h) @ W^T on column pairs: h (n, d), nw (d,), W (columns, d). Pair p < pairs is the columns cols(p); for
// each row of h (in passes of SMALL_ROWS rows, their norm scales first) the warp of pair p calls
// epilogue(p, row, dot_a, dot_b) once, from lane row % SMALL_ROWS. The normed input is rms_norm_rows' bit for bit.
template <class W, class Cols, class Epilogue>
__device__ __forceinline__ void norm_pairs(const float* __restrict__ h, const float* __restrict__ nw, float eps,
                                           const W* __restrict__ w, int n, int d, int pairs, Cols cols,
                                           Epilogue epilogue)
{
    __shared__ float red[WARPS];
    __shared__ float scale[SMALL_ROWS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r0 = 0; r0 < n; r0 += SMALL_ROWS) {
        const int nr = min(SMALL_ROWS, n - r0);
        const float* x = h + (long long)r0 * d;
        row_scales(x, d, nr, eps, red, scale);
        auto normed = [&](int r, int j) {
            return operand(w, __fmul_rn(__fmul_rn(x[(long long)r * d + j], scale[r]), nw[j]));
        };
        for (int base = blockIdx.x * WARPS; base < pairs; base += gridDim.x * WARPS) {
            const int p = base + warp;
            const bool valid = p < pairs;
            const ColPair col = cols(valid ? p : 0);
            const W* rows[2] = {w + col.a * d, w + col.b * d};
            float acc[2][SMALL_ROWS];
            warp_dots<2>(rows, normed, nr, d, valid, acc);
#pragma unroll
            for (int r = 0; r < SMALL_ROWS; ++r)
                if (valid && r < nr && lane == r) epilogue(p, r0 + r, acc[0][r], acc[1][r]);
        }
        __syncthreads();  // scale is rewritten by the next rows
    }
}

// out (n, heads * 2 * half) = RMSNorm(h) @ W^T with RoPE on the first rot_heads heads. W (heads * 2 * half, d).
// Column pair p = (head, t): columns head * 2 half + t and + half, rotated at angle pos[row] * inv_freq[t] as
// passes.cu's rope_qk rotates them; heads from rot_heads on (v) are written as they are.
template <class W>
__device__ __forceinline__ void norm_rope(const float* __restrict__ h, const float* __restrict__ nw, float eps,
                                          const W* __restrict__ w, const int* __restrict__ pos,
                                          const float* __restrict__ inv_freq, float* __restrict__ out,
                                          int n, int d, int heads, int rot_heads, int half)
{
    const long long width = (long long)heads * 2 * half;
    auto cols = [&](int p) {
        const long long a = (long long)(p / half) * 2 * half + p % half;
        return ColPair{a, a + half};
    };
    norm_pairs(h, nw, eps, w, n, d, heads * half, cols, [&](int p, int row, float a, float b) {
        const int head = p / half, t = p % half;
        float* o = out + row * width + cols(p).a;
        if (head < rot_heads) {
            const float angle = __fmul_rn((float)pos[row], inv_freq[t]);
            const float c = cosf(angle), s = sinf(angle);
            o[0] = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s));
            o[half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        } else {
            o[0] = a;
            o[half] = b;
        }
    });
}

// out (n, f) = silu(g) * u with (g, u) = RMSNorm(h) @ W^T's columns p and f + p: W (2 f, d) (the fused gate/up
// weight), silu * up as passes.cu's silu_mul computes it.
template <class W>
__device__ __forceinline__ void norm_silu(const float* __restrict__ h, const float* __restrict__ nw, float eps,
                                          const W* __restrict__ w, float* __restrict__ out, int n, int d, int f)
{
    norm_pairs(h, nw, eps, w, n, d, f, [&](int p) { return ColPair{p, (long long)f + p}; },
               [&](int p, int row, float g, float u) {
                   out[(long long)row * f + p] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.f, expf(-g))), u);
               });
}

// out (n, m) = x @ W^T (+ res): x (n, d), W (m, d), res (n, m) or nullptr.
template <class W>
__device__ __forceinline__ void linear_rows(const float* __restrict__ x, const W* __restrict__ w,
                                            const float* __restrict__ res, float* __restrict__ out,
                                            int n, int d, int m)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r0 = 0; r0 < n; r0 += SMALL_ROWS) {
        const int nr = min(SMALL_ROWS, n - r0);
        const float* xr = x + (long long)r0 * d;
        auto input = [&](int r, int j) { return operand(w, xr[(long long)r * d + j]); };
        for (int base = blockIdx.x * WARPS; base < m; base += gridDim.x * WARPS) {
            const int c = base + warp;
            const bool valid = c < m;
            const W* rows[1] = {w + (long long)(valid ? c : 0) * d};
            float acc[1][SMALL_ROWS];
            warp_dots<1>(rows, input, nr, d, valid, acc);
#pragma unroll
            for (int r = 0; r < SMALL_ROWS; ++r) {
                if (!valid || r >= nr || lane != r) continue;
                const long long at = (long long)(r0 + r) * m + c;
                out[at] = res ? __fadd_rn(res[at], acc[0][r]) : acc[0][r];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
norm_rope_f32(const float* __restrict__ h, const float* __restrict__ nw, float eps, const float* __restrict__ w,
              const int* __restrict__ pos, const float* __restrict__ inv_freq, float* __restrict__ out,
              int n, int d, int heads, int rot_heads, int half)
{
    norm_rope(h, nw, eps, w, pos, inv_freq, out, n, d, heads, rot_heads, half);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
norm_rope_bf16(const float* __restrict__ h, const float* __restrict__ nw, float eps,
               const unsigned short* __restrict__ w, const int* __restrict__ pos, const float* __restrict__ inv_freq,
               float* __restrict__ out, int n, int d, int heads, int rot_heads, int half)
{
    norm_rope(h, nw, eps, w, pos, inv_freq, out, n, d, heads, rot_heads, half);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
norm_silu_f32(const float* __restrict__ h, const float* __restrict__ nw, float eps, const float* __restrict__ w,
              float* __restrict__ out, int n, int d, int f)
{
    norm_silu(h, nw, eps, w, out, n, d, f);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
norm_silu_bf16(const float* __restrict__ h, const float* __restrict__ nw, float eps,
               const unsigned short* __restrict__ w, float* __restrict__ out, int n, int d, int f)
{
    norm_silu(h, nw, eps, w, out, n, d, f);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
linear_rows_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ res,
                float* __restrict__ out, int n, int d, int m)
{
    linear_rows(x, w, res, out, n, d, m);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
linear_rows_bf16(const float* __restrict__ x, const unsigned short* __restrict__ w, const float* __restrict__ res,
                 float* __restrict__ out, int n, int d, int m)
{
    linear_rows(x, w, res, out, n, d, m);
}
