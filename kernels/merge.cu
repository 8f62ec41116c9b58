// Exact merge of partial attention results (architecture.md §1):
//   L = logsumexp_p(lse_p),  o = sum_p exp(lse_p - L) o_p.
// A row whose partials are all -inf gives (o = 0, lse = -inf).
// o_parts (P, n, H, D) and lse_parts (P, n, H) are float32 with arbitrary element strides, so views
// (e.g. a slice of a packed receive buffer) need no copy. Outputs are contiguous: o (n, H, D), lse (n, H).
// One thread per output element of o (grid-stride, any block size); the thread with d == 0 also writes lse.
// Loaded by rshard_hpc/ops/attention_cuda.py after kernels/common.cuh (merge_element: the arithmetic;
// row_head_dim); needs no define.

extern "C" __global__ void merge_partials(
    const float* __restrict__ o_parts, const float* __restrict__ lse_parts,
    float* __restrict__ o, float* __restrict__ lse,
    int P, int n, int H, int D,
    long long so0, long long so1, long long so2, long long so3,
    long long sl0, long long sl1, long long sl2)
{
    const long long total = (long long)n * H * D;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const RowHeadDim e = row_head_dim(idx, H, D);
        const float* lse_row = lse_parts + e.row * sl1 + e.head * sl2;
        const float* o_row = o_parts + e.row * so1 + e.head * so2 + e.d * so3;
        float row_lse;
        o[idx] = merge_element(P, [&](int p) { return lse_row[p * sl0]; }, [&](int p) { return o_row[p * so0]; },
                               &row_lse);
        if (e.d == 0) lse[e.rh] = row_lse;
    }
}
