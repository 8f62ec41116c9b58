// The CompNode's per-token passes, fused (architecture.md §7): each kernel is one launch of what the NumPy
// path (rshard_hpc/models/common.py, models/llama.py, ops/precision.py, ops/wire.py) does in several steps.
// Loaded by rshard_hpc/ops/passes_cuda.py after kernels/common.cuh (NEG_INF, merge_element, wire_value, wire_lse,
// bf16_bits, row_head_dim, block_sum).
//
// Numerics. Every elementwise step is one correctly rounded fp32 operation, in the NumPy path's order,
// written with the _rn intrinsics so that no multiply-add is contracted into an fma: such a step gives the
// NumPy path's value bit for bit. The differences, each within fp32 rounding:
//   - row sums (RMSNorm's mean square, LayerNorm's mean and variance) are one thread's strided partial
//     sums, then a tree over the block (a fixed order: the same result every run); NumPy sums pairwise;
//   - cosf, sinf, expf (within 2 ulp) and erfcf (within 4 ulp) are CUDA's; NumPy's / SciPy's float32
//     functions, and ops/gelu_host.py's erfc, may differ from them by an ulp or a few.
// bf16 outputs are uint16 bit patterns of the fp32 result, rounded to nearest even, NaN -> BF16_NAN:
// exactly ops/precision.to_bf16_bits of the fp32 output.

#ifndef PASS_THREADS
#error "PASS_THREADS must be defined by the host (rshard_hpc passes launch layer)"
#endif
#ifndef BF16_NAN
#error "BF16_NAN must be defined by the host (rshard_hpc passes launch layer)"
#endif
#if PASS_THREADS % 32 || PASS_THREADS > 1024 || (PASS_THREADS & (PASS_THREADS - 1))
#error "PASS_THREADS must be a power of 2, a multiple of 32, at most 1024"
#endif

// RMSNorm, one block per row of x (n, d), fp32:
//   v = x (+ r when r != nullptr; then also written to h_out), scale = 1 / sqrt(mean(v*v) + eps),
//   y = (v * scale) * w; y_bits (when not nullptr) = bf16 bits of y.
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
rms_norm_rows(const float* __restrict__ x, const float* __restrict__ r, const float* __restrict__ w,
              float* __restrict__ h_out, float* __restrict__ y, unsigned short* __restrict__ y_bits,
              int n, int d, float eps)
{
    __shared__ float red[PASS_THREADS / 32];
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        const long long base = row * d;
        float acc = 0.f;
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) {
            const float v = r ? __fadd_rn(x[base + j], r[base + j]) : x[base + j];
            if (r) h_out[base + j] = v;
            acc = __fadd_rn(acc, __fmul_rn(v, v));
        }
        const float mean = __fdiv_rn(block_sum(acc, red), (float)d);
        const float scale = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(mean, eps)));
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) {
            const float v = r ? __fadd_rn(x[base + j], r[base + j]) : x[base + j];
            const float out = __fmul_rn(__fmul_rn(v, scale), w[j]);
            y[base + j] = out;
            if (y_bits) y_bits[base + j] = bf16_bits(out);
        }
    }
}

// LayerNorm (+ bias), one block per row of x (n, d), fp32, two passes over the row (mean, then variance):
//   v = x (+ (r + rb) when r != nullptr; rb (d,) may be nullptr), mean = sum(v) / d,
//   var = sum((v - mean)^2) / d, y = ((v - mean) / sqrt(var + eps)) * w + b.
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
layer_norm_rows(const float* __restrict__ x, const float* __restrict__ r, const float* __restrict__ rb,
                const float* __restrict__ w, const float* __restrict__ b, float* __restrict__ y,
                int n, int d, float eps)
{
    __shared__ float red[PASS_THREADS / 32];
    for (long long row = blockIdx.x; row < n; row += gridDim.x) {
        const long long base = row * d;
#define LN_VALUE(j) (r ? __fadd_rn(x[base + (j)], rb ? __fadd_rn(r[base + (j)], rb[j]) : r[base + (j)]) \
                       : x[base + (j)])
        float acc = 0.f;
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) acc = __fadd_rn(acc, LN_VALUE(j));
        const float mean = __fdiv_rn(block_sum(acc, red), (float)d);
        acc = 0.f;
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) {
            const float c = __fsub_rn(LN_VALUE(j), mean);
            acc = __fadd_rn(acc, __fmul_rn(c, c));
        }
        const float var = __fdiv_rn(block_sum(acc, red), (float)d);
        const float den = __fsqrt_rn(__fadd_rn(var, eps));
        for (int j = threadIdx.x; j < d; j += PASS_THREADS) {
            const float c = __fsub_rn(LN_VALUE(j), mean);
            y[base + j] = __fadd_rn(__fmul_rn(__fdiv_rn(c, den), w[j]), b[j]);
        }
#undef LN_VALUE
    }
}

// RoPE (Hugging Face rotate_half) on q (n, Hq, D) and k (n, Hk, D) in one launch, fp32, into qo and ko
// (contiguous). Row r of q starts at q + r * q_ld (of k: k + r * k_ld), its heads contiguous within the row:
// q and k may be column slices of one product's rows (the fused q/k/v product: q_ld = k_ld = its row width).
// One thread per pair (d, d + D/2) of one row and head; the angle pos * inv_freq[d] in fp32 (pos converted
// to float, rounded to nearest, as NumPy's astype):
//   out[d] = x[d] cos - x[d + D/2] sin,  out[d + D/2] = x[d + D/2] cos + x[d] sin.
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
rope_qk(const float* __restrict__ q, const float* __restrict__ k, const int* __restrict__ pos,
        const float* __restrict__ inv_freq, float* __restrict__ qo, float* __restrict__ ko,
        int n, int hq, int hk, int half, long long q_ld, long long k_ld)
{
    const long long per_row = (long long)(hq + hk) * half;
    const long long total = n * per_row;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / per_row;
        const long long rest = idx % per_row;
        const int head = (int)(rest / half), j = (int)(rest % half);
        const bool is_q = head < hq;
        const long long in = is_q ? row * q_ld + (long long)head * 2 * half
                                  : row * k_ld + (long long)(head - hq) * 2 * half;
        const long long at = is_q ? (row * hq + head) * 2 * half : (row * hk + head - hq) * 2 * half;
        const float* src = is_q ? q : k;
        float* dst = is_q ? qo : ko;
        const float angle = __fmul_rn((float)pos[row], inv_freq[j]);
        const float c = cosf(angle), s = sinf(angle);
        const float a = src[in + j], b = src[in + j + half];
        dst[at + j] = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s));
        dst[at + j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// out (n, f) = silu(gate) * up = (g / (1 + exp(-g))) * u over `total` = n * f elements, out contiguous; row r
// of gate starts at gate + r * gate_ld, of up at up + r * up_ld (gate and up may be the two column halves of
// one product's rows: the fused gate/up product). out_bits (when not nullptr) the bf16 bits of out (the next
// product's input under --dtype bfloat16).
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
silu_mul(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out,
         unsigned short* __restrict__ out_bits, long long total, int f, long long gate_ld, long long up_ld)
{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / f, col = idx % f;
        const float g = gate[row * gate_ld + col];
        const float value = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.f, expf(-g))), up[row * up_ld + col]);
        out[idx] = value;
        if (out_bits) out_bits[idx] = bf16_bits(value);
    }
}

// out = gelu(y + b) = (v * 0.5) * erfc(-(v * inv_sqrt2)) with v = y + b[j]: the exact (erf) form, 1 + erf(z) =
// erfc(-z), written with erfc, which keeps its relative accuracy where 1 + erf(z) cancels (z below about -1.5:
// 1e-5 relative at v = -3.3, all of it lost below v = -8); ops/gelu_host.py does the same on CPUs. Over y (n, d),
// b (d,); out_bits (when not nullptr) the bf16 bits of out.
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
bias_gelu(const float* __restrict__ y, const float* __restrict__ b, float* __restrict__ out,
          unsigned short* __restrict__ out_bits, long long total, int d, float inv_sqrt2)
{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const float v = __fadd_rn(y[idx], b[idx % d]);
        const float value = __fmul_rn(__fmul_rn(v, 0.5f), erfcf(-__fmul_rn(v, inv_sqrt2)));
        out[idx] = value;
        if (out_bits) out_bits[idx] = bf16_bits(value);
    }
}

// ---- the wire (ops/wire.py: WireRoutes)
// q, k, v are read as units of `unit` floats: q's units first (n_q units), then k's (n_k), then v's. Unit u
// of q is unit u % gq of q's row u / gq, that row starting at q + row * q_ld (k, v: gk units a row, k_ld, v_ld):
// the rows may be column slices of one product's rows. The send buffer's unit u is source unit src[u];
// pack_f32 copies it, pack_bf16 writes its bf16 bits.
struct WireRows {
    const float* q; const float* k; const float* v;
    long long n_q, n_k, q_ld, k_ld, v_ld;
    int unit, gq, gk;
};

__device__ __forceinline__ float packed_value(const WireRows& w, const int* src, long long idx) {
    long long s = src[idx / w.unit];
    const long long c = idx % w.unit;
    if (s < w.n_q) return w.q[(s / w.gq) * w.q_ld + (s % w.gq) * w.unit + c];
    s -= w.n_q;
    if (s < w.n_k) return w.k[(s / w.gk) * w.k_ld + (s % w.gk) * w.unit + c];
    s -= w.n_k;
    return w.v[(s / w.gk) * w.v_ld + (s % w.gk) * w.unit + c];
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
pack_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
         const int* __restrict__ src, float* __restrict__ out, long long total, int unit, long long n_q,
         long long n_k, int gq, int gk, long long q_ld, long long k_ld, long long v_ld)
{
    const WireRows w{q, k, v, n_q, n_k, q_ld, k_ld, v_ld, unit, gq, gk};
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x)
        out[idx] = packed_value(w, src, idx);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
pack_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
          const int* __restrict__ src, unsigned short* __restrict__ out, long long total, int unit, long long n_q,
          long long n_k, int gq, int gk, long long q_ld, long long k_ld, long long v_ld)
{
    const WireRows w{q, k, v, n_q, n_k, q_ld, k_ld, v_ld, unit, gq, gk};
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x)
        out[idx] = bf16_bits(packed_value(w, src, idx));
}

// Unpack + merge of the partials a CompNode receives: recv holds rows of H * slots wire elements, one per
// (part p, local row) at recv row src[p * n + row]; per head, D values of o then the lse (one float32, or
// its two uint16 halves, low half first, under bf16). o (n, H, D) float32 is the exact merge over the
// P parts (common.cuh merge_element: the arithmetic of merge.cu); the merged lse is not needed and not written.
template <class Wire>
__device__ __forceinline__ void unpack_merge(const Wire* __restrict__ recv, const int* __restrict__ src,
                                             float* __restrict__ o, int P, int n, int H, int D, int slots)
{
    const long long total = (long long)n * H * D;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const RowHeadDim e = row_head_dim(idx, H, D);
        auto at = [&](int p) { return ((long long)src[(long long)p * n + e.row] * H + e.head) * slots; };
        float lse;
        o[idx] = merge_element(P, [&](int p) { return wire_lse(recv, at(p) + D); },
                               [&](int p) { return wire_value(recv[at(p) + e.d]); }, &lse);
    }
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
unpack_merge_f32(const float* __restrict__ recv, const int* __restrict__ src, float* __restrict__ o,
                 int P, int n, int H, int D, int slots)
{
    unpack_merge(recv, src, o, P, n, H, D, slots);
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
unpack_merge_bf16(const unsigned short* __restrict__ recv, const int* __restrict__ src, float* __restrict__ o,
                  int P, int n, int H, int D, int slots)
{
    unpack_merge(recv, src, o, P, n, H, D, slots);
}
