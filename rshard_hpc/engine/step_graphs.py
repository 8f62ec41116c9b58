"""CUDA graphs of a CompNode's layers for small GPU steps (architecture.md §7, issue 13).

A decode step gives the CompNode that holds the new token one row, and its layer is then a few launches of
kernels/small_rows.cu and passes.cu (Llama.graph_safe: no cuBLAS call, which CuPy cannot capture). Issuing them
one by one cost 100-150 µs of host time per pass in a 7- or 13-rank job on one GPU: more than the GPU's work.
Here each layer's two passes are captured once per row count as two CUDA graphs and replayed with one launch
each:

    pre[l]:  rows h[l] -> model.pre -> routes.pack -> send[l]          (before the q/k/v exchange)
    post[l]: recv -> routes.merge -> model.post(h[l], …) -> h[l + 1]   (after the partials' exchange)

A graph reads and writes fixed addresses, so each step's values go into fixed buffers first (begin_step: the
first layer's rows, the positions, the wire's index arrays; the transport receives straight into `recv`), and
h[l], send[l] are the arrays the capture made, kept with the graphs. Captures run on their own stream, so what
CuPy's memory pool hands out during a capture is that stream's memory, never the arrays of ordinary work; a
capture's temporaries are reused only by later captures, whose graphs replay after it within a step.

Same result as the passes run one launch at a time (the same kernels on the same values). RSHARD_STEP_GRAPHS=0
turns the graphs off (benchmarks' before/after).
"""
from __future__ import annotations

import os

ENV_VAR = "RSHARD_STEP_GRAPHS"
ENABLED = os.environ.get(ENV_VAR, "1") != "0"


class StepGraphs:
    """The graphs of one CompNode for steps of n rows, layers first_layer … n_layers-1, captured layer by layer at
    the first step that runs them. routes: that step's WireRoutes (its index arrays become the fixed ones);
    n_recv: the elements of a layer's receive buffer."""

    def __init__(self, model, routes, n_recv: int):
        import cupy

        self.cupy, self.model, self.routes = cupy, model, routes
        n = routes.n
        self.h0 = cupy.empty((n, model.cfg.hidden), dtype=cupy.float32)  # the first layer's rows
        self.pos = cupy.empty(n, dtype=cupy.int32)  # the rows' positions, as the RoPE kernel reads them
        self.recv = cupy.empty(n_recv, dtype=routes.wire)  # every layer's partials arrive here
        self.stream = cupy.cuda.Stream(non_blocking=True)  # captures only
        self.rows = {}  # layer -> the rows its graphs read (h0 for the first layer, else the previous post's output)
        self.sends = {}  # layer -> the send buffer its pre graph writes
        self.graphs = {}  # (layer, "pre" | "post") -> cupy.cuda.Graph

    def begin_step(self, h, pos, routes) -> None:
        """This step's first-layer rows h (n, d), positions pos (n,) (both on the device) and wire routes (same
        sizes as the captured ones: same n and β) into the fixed buffers: device-to-device copies, no host wait."""
        self.h0[...] = h
        self.pos[...] = pos
        self.routes.send_units[...] = routes.send_units
        self.routes.recv_rows[...] = routes.recv_rows

    def pre(self, layer: int, first: bool):
        """Replay layer's pre pass (captured first if new); returns the send buffer it writes."""
        key = (layer, "pre")
        if key not in self.graphs:
            rows = self.rows.setdefault(layer, self.h0) if first else self.rows[layer]
            self.graphs[key], self.sends[layer] = self._capture(lambda: self._pre(layer, rows))
        self.graphs[key].launch(self.cupy.cuda.get_current_stream())
        return self.sends[layer]

    def post(self, layer: int):
        """Replay layer's post pass on what arrived in `recv`; returns the next layer's rows."""
        key = (layer, "post")
        if key not in self.graphs:
            rows = self.rows[layer]
            self.graphs[key], self.rows[layer + 1] = self._capture(
                lambda: self.model.post(layer, rows, self.routes.merge(self.recv)))
        self.graphs[key].launch(self.cupy.cuda.get_current_stream())
        return self.rows[layer + 1]

    def _pre(self, layer: int, rows):
        tables = self.model.rope_tables(self.pos, True)
        if tables is not self.pos:  # a copy made inside the capture would be read by every replay, stale
            raise RuntimeError("step graphs: the RoPE positions must be read in place")
        return self.routes.pack(*self.model.pre(layer, rows, self.pos))

    def _capture(self, work):
        """(graph, result) of work() captured on the capture stream (the work launches, nothing runs yet)."""
        with self.stream:
            self.stream.begin_capture()
            try:
                result = work()
            finally:
                graph = self.stream.end_capture()
        return graph, result
