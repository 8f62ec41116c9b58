"""Can CuPy capture a CUDA graph of our decode passes (allocations inside), and what does a launch cost?"""
import time, cupy as cp, numpy as np
x = cp.random.rand(1, 576, dtype=cp.float32); w = cp.random.rand(576, 1536, dtype=cp.float32); w2 = cp.random.rand(1536, 576, dtype=cp.float32)
def f(x):
    a = x @ w
    b = a * cp.float32(0.5) + 1
    return b @ w2 + x
ref = f(x); cp.cuda.Device().synchronize()
s = cp.cuda.Stream(non_blocking=True)
pool = cp.cuda.MemoryPool()
try:
    with s, cp.cuda.using_allocator(pool.malloc):
        s.begin_capture()
        out = f(x)
        g = s.end_capture()
    g.launch(s); s.synchronize()
    print("graph ok, diff", float(abs(out - ref).max()))
    for name, fn in (("eager", lambda: f(x)), ("graph", lambda: g.launch(s))):
        with s:
            for _ in range(10): fn()
            s.synchronize(); t = time.perf_counter()
            for _ in range(1000): fn()
            s.synchronize()
        print(name, f"{(time.perf_counter() - t) * 1e3:.1f} us per call")
except Exception as e:
    print("graph capture failed:", type(e).__name__, e)
