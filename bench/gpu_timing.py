"""GPU micro-benchmark timing shared by bench_skinny_matmul and bench_gemv_layouts: calls
captured in one CUDA graph (launch overhead out, as in the engine's decode graphs), weights
cycled through enough copies that every launch reads from DRAM, not L2, and the card's copy
bandwidth as the ceiling. On CPU (dry runs) one eager call: plumbing, never a figure."""

from __future__ import annotations

import statistics
import time

import torch

L2_DEFEAT_BYTES = 256 << 20  # weight copies per case: at least this many bytes in rotation
MAX_COPIES = 32


def weight_copies(w_bytes: int, cuda: bool) -> int:
    """Copies of a weight to cycle through so each launch reads it from DRAM (one on CPU)."""
    return min(MAX_COPIES, max(1, -(-L2_DEFEAT_BYTES // w_bytes))) if cuda else 1


def time_us(fns: list, iters: int, reps: int, cuda: bool) -> tuple[float, bool]:
    """Median microseconds per call of fns[i % len(fns)]; (us, timed inside a CUDA graph)."""
    if not cuda:  # dry run: one eager call, a meaningless figure that exercises the plumbing
        fns[0]()  # warm-up (the interpreter's first call of a specialisation is slower)
        t0 = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t0) * 1e6, False
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fns[i % len(fns)]()
        run, in_graph = graph.replay, True
    except Exception:  # fall back to eager launches (launch overhead included)
        def run():
            for i in range(iters):
                fns[i % len(fns)]()
        in_graph = False
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples), in_graph


def copy_bandwidth_gbs(device, cuda: bool) -> float:
    """Device-to-device copy: (read + write) bytes / s of a 1 GiB buffer (4 MiB on CPU)."""
    src = torch.empty((1 << 30) if cuda else (4 << 20), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = time_us([lambda: dst.copy_(src)], 10 if cuda else 1, 5 if cuda else 1, cuda)
    return 2 * src.numel() / us / 1e3
