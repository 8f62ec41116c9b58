// The device-signalled CUDA IPC exchange (dist/ipc_signal.py): an Alltoallv among the ranks of one GPU whose
// ranks never wait on the host. A sender's `publish` copies its send buffer into its outbox and then posts a
// note into every peer's mailbox and counts it there; a receiver's stream waits (cuStreamWaitValue64, in the
// GPU's front end: no SM is held while it waits) until its mailbox's count says every peer has posted this
// call, then its `collect` copies its bytes out of the peers' outboxes. All of it is queued on the rank's
// stream, so a rank's host queues a whole step ahead of its GPU.
//
// mailbox (each rank's, mapped by its peers): long long [HEADER_WORDS + 2 size NOTE_WORDS]: word 0 counts the
// notes ever posted to me (each peer adds 1 a call, after its note), then slot [parity][sender] = {call,
// offset of the bytes for me in the sender's outbox, their count, unused}.
// Why the count and two slots suffice: a peer posts call c + 1 only after its collect of call c, which waited
// for every peer's note of c; so my count reaches c * size only once every peer has posted c, and no peer posts
// c + 2 (the slot of c) before I have posted c + 1, after my collect of c read the slot.
// status (the receiver's): 0, or 1 + s when peer s's slot does not hold this call (the protocol broken), or
// -(1 + s) when peer s posted another byte count than I expect (the host raises at the step's end).

#ifndef PASS_THREADS
#error "PASS_THREADS must be defined by the host (dist/ipc_signal.py)"
#endif

#define HEADER_WORDS 8
#define NOTE_WORDS 4

// n words from src to dst over the whole grid, four loads in flight a thread (a copy is bound by memory latency:
// one load at a time left 8 blocks at a fraction of the bandwidth); reads at L2 (ld.global.cg): a peer's outbox
// changes between calls, an L1 line of an earlier call must not answer.
template <class W>
__device__ __forceinline__ void copy_words(W* __restrict__ dst, const W* __restrict__ src, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const W a = __ldcg(src + i), b = __ldcg(src + i + stride);
        const W c = __ldcg(src + i + 2 * stride), d = __ldcg(src + i + 3 * stride);
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n; i += stride)
        dst[i] = __ldcg(src + i);
}

// n bytes from src to dst over the whole grid, in the widest word dividing both addresses and n.
__device__ __forceinline__ void grid_copy(char* __restrict__ dst, const char* __restrict__ src, long long n)
{
    const unsigned long long joint = (unsigned long long)dst | (unsigned long long)src | (unsigned long long)n;
    if ((joint & 15ull) == 0)
        copy_words(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(src), n / 16);
    else if ((joint & 3ull) == 0)
        copy_words(reinterpret_cast<unsigned int*>(dst), reinterpret_cast<const unsigned int*>(src), n / 4);
    else
        copy_words(reinterpret_cast<unsigned short*>(dst), reinterpret_cast<const unsigned short*>(src), n / 2);
}

// send (nbytes) -> outbox, then, once every block has copied (the last block to finish does it), the note for
// each peer t (routes[2 t]: the offset of t's bytes in send, routes[2 t + 1]: their count), then one more in
// t's count. done: a counter of finished blocks, zero between launches (the last block resets it).
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
signal_publish(const char* __restrict__ send, long long nbytes, char* __restrict__ outbox,
               const long long* __restrict__ routes, const unsigned long long* __restrict__ mailboxes,
               unsigned int* __restrict__ done, int me, int size, int parity, long long call)
{
    __shared__ int last;
    grid_copy(outbox, send, nbytes);
    __threadfence();  // this thread's copies are visible GPU-wide before the block counts itself done
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // every block's copies are seen before any note
    for (int t = threadIdx.x; t < size; t += blockDim.x) {
        volatile long long* box = reinterpret_cast<long long*>(mailboxes[t]);
        volatile long long* slot = box + HEADER_WORDS + NOTE_WORDS * (parity * size + me);
        slot[1] = routes[2 * t];
        slot[2] = routes[2 * t + 1];
        slot[0] = call;
        __threadfence_system();  // the note before its count
        atomicAdd(reinterpret_cast<unsigned long long*>(mailboxes[t]), 1ull);
    }
    if (threadIdx.x == 0) *done = 0u;
}

// After the stream's wait for this call's count: peer s's bytes from its outbox (outboxes[parity * size + s] + the
// note's offset) to dst + expect[2 s]; expect[2 s + 1]: the count I expect. A failed check copies nothing.
extern "C" __global__ void __launch_bounds__(PASS_THREADS)
signal_collect(char* __restrict__ dst, const long long* __restrict__ mailbox,
               const unsigned long long* __restrict__ outboxes, const long long* __restrict__ expect,
               int* __restrict__ status, int size, int parity, long long call)
{
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    for (int t = threadIdx.x; t < size; t += blockDim.x) {
        volatile const long long* slot = mailbox + HEADER_WORDS + NOTE_WORDS * (parity * size + t);
        if (slot[0] != call) {
            atomicCAS(status, 0, 1 + t);
            failed = 1;
        } else if (slot[2] != expect[2 * t + 1]) {
            atomicCAS(status, 0, -(1 + t));
            failed = 1;
        }
    }
    __syncthreads();
    if (failed) return;
    for (int s = 0; s < size; ++s) {
        const long long n = expect[2 * s + 1];
        volatile const long long* slot = mailbox + HEADER_WORDS + NOTE_WORDS * (parity * size + s);
        const long long offset = slot[1];
        if (n)
            grid_copy(dst + expect[2 * s], reinterpret_cast<const char*>(outboxes[parity * size + s]) + offset, n);
    }
}
