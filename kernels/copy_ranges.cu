// Byte ranges copied by the SMs, for the CUDA IPC exchange (dist/device_copy.py): a copy-engine memcpy per peer
// queues behind the other processes' copies on one GPU (13 ranks under MPS); a kernel runs beside them.
// table: n_ranges rows of (source address, destination offset, bytes), host memory the kernel reads in place
// (page-locked: mapped for the device under unified addressing). Range r is copied from its source to
// dst + offset in words of `unit` bytes (4, 2 or 1: every address, offset and size of the launch is a multiple).
// Blocks along y take ranges, along x stride over a range's words (one emulated block does it all).

template <typename Word>
__device__ __forceinline__ void copy_words(char* __restrict__ dst, const char* __restrict__ src, long long n)
{
    Word* d = reinterpret_cast<Word*>(dst);
    const Word* s = reinterpret_cast<const Word*>(src);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        d[i] = s[i];
}

extern "C" __global__ void __launch_bounds__(PASS_THREADS)
copy_ranges(char* __restrict__ dst, const long long* __restrict__ table, int n_ranges, int unit)
{
    for (int r = blockIdx.y; r < n_ranges; r += gridDim.y) {
        const char* src = reinterpret_cast<const char*>(table[3 * r]);
        char* out = dst + table[3 * r + 1];
        const long long nbytes = table[3 * r + 2];
        if (unit == 4) copy_words<unsigned int>(out, src, nbytes / 4);
        else if (unit == 2) copy_words<unsigned short>(out, src, nbytes / 2);
        else copy_words<unsigned char>(out, src, nbytes);
    }
}
