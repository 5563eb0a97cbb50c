"""The A/B variants of bench.run: the unquantized engine once more with one option changed,
run on FUSED_WORKLOADS (W-RANDOM, W-PREFIX, W-BATCH1; a variant may name others) as system
llmbatch-<name>.

One table serves the command line (a flag each), the engine overrides and the CPU rows: a
variant whose option only changes Triton kernel paths would repeat the llmbatch row on the CPU,
so there its rows say why they were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Variant:
    flag: str                       # bench.run option that adds the rows
    overrides: dict = field(default_factory=dict)   # EngineConfig fields changed
    what: str = ""                  # help text: what the option does
    cpu_skip: Optional[str] = None  # reason the CPU rows are skipped; None: they run
    workloads: Optional[tuple] = None  # the workloads it runs; None: FUSED_WORKLOADS

    @property
    def dest(self) -> str:
        """The argparse attribute of `flag`."""
        return self.flag.lstrip("-").replace("-", "_")


AB_VARIANTS = {
    "unfused": Variant("--unfused", {"fused_kernels": False},
                       "EngineConfig.fused_kernels off (torch RMSNorm, SiLU·mul, rotary; the "
                       "CPU path is always unfused)", "fused kernels run on CUDA only"),
    "async": Variant("--async-scheduling", {"async_scheduling": True},
                     "EngineConfig.async_scheduling on (step n+1 planned while step n runs; "
                     "the default on CUDA, so this row is for the CPU)"),
    "sync": Variant("--sync-scheduling", {"async_scheduling": False},
                    "EngineConfig.async_scheduling off (the A/B of the CUDA default)",
                    "the CPU default is synchronous already"),
    "skinny": Variant("--skinny", {"skinny_matmul": True},
                      "EngineConfig.skinny_matmul on (fused Triton matmuls for decode steps of "
                      "<= 16 tokens)", "skinny matmul runs on CUDA only"),
    "pdl": Variant("--pdl", {"pdl": True},
                   "EngineConfig.pdl on (programmatic dependent launch of our Triton kernels, "
                   "sm_90+; the default there since stop 17, so these rows repeat llmbatch's)",
                   "PDL runs on CUDA only"),
    "skinny-pdl": Variant("--skinny-pdl", {"skinny_matmul": True, "pdl": True},
                          "EngineConfig.skinny_matmul and EngineConfig.pdl on (programmatic "
                          "dependent launch of the skinny and our other Triton kernels, "
                          "sm_90+)",
                          "skinny matmul with PDL runs on CUDA only"),
    "skinny-gemv": Variant("--skinny-gemv", {"skinny_matmul": True, "skinny_gemv": True},
                           "EngineConfig.skinny_matmul and skinny_gemv on (one-token decode "
                           "steps on the one-row Triton GEMV with fused norm / residual / "
                           "SiLU·mul and in-launch split-K: the W-BATCH1 candidate)",
                           "skinny gemv runs on CUDA only"),
    "skinny-gemv-pdl": Variant("--skinny-gemv-pdl",
                               {"skinny_matmul": True, "skinny_gemv": True, "pdl": True},
                               "skinny_matmul, skinny_gemv and pdl on (the gemv launches and "
                               "our other Triton kernels with programmatic dependent launch, "
                               "sm_90+)", "skinny gemv with PDL runs on CUDA only"),
    # The A/B of stop 17's default change (skinny_gemv and pdl went from off to auto-on):
    "old-defaults": Variant("--old-defaults", {"skinny_gemv": False, "pdl": False,
                                               "rotary_in_attention": False,
                                               "gemv_weight_prefetch": "off"},
                            "EngineConfig.skinny_gemv, pdl, rotary_in_attention and "
                            "gemv_weight_prefetch off (the defaults until stop 17: cuBLAS for "
                            "one-token steps, no programmatic dependent launch)",
                            "skinny gemv and PDL run on CUDA only"),
    # The A/B of stop 19's (rotary_in_attention and gemv_weight_prefetch went to auto-on):
    "prev-defaults": Variant("--prev-defaults", {"rotary_in_attention": False,
                                                 "gemv_weight_prefetch": "off"},
                             "EngineConfig.rotary_in_attention and gemv_weight_prefetch off "
                             "(the defaults of stops 17-18: rotary + K/V store and attention "
                             "in two launches, no gemv weight read before the PDL wait)",
                             "the fused rotary and the gemv layers run on CUDA only"),
    "no-gemv": Variant("--no-gemv", {"skinny_gemv": False},
                       "EngineConfig.skinny_gemv off (PDL alone: the gemv path's share of "
                       "the default)", "skinny gemv runs on CUDA only"),
    "no-pdl": Variant("--no-pdl", {"pdl": False},
                      "EngineConfig.pdl off (the gemv path alone)", "PDL runs on CUDA only"),
    "gemv-prefetch": Variant("--gemv-prefetch", {"gemv_weight_prefetch": "tile"},
                             "EngineConfig.gemv_weight_prefetch tile (gemv programs load their "
                             "first weight tile before the PDL wait; the default with PDL since "
                             "stop 19, so these rows repeat llmbatch's there)",
                             "the gemv layers run on CUDA only"),
    "gemv-prefetch-l2": Variant("--gemv-prefetch-l2", {"gemv_weight_prefetch": "l2"},
                                "EngineConfig.gemv_weight_prefetch l2 (gemv programs prefetch "
                                "their weight slice into L2 before the PDL wait; 0.90x at "
                                "batch 1 in stop 19's sweep)",
                                "the gemv layers run on CUDA only"),
    "rotary-attn": Variant("--rotary-in-attention", {"rotary_in_attention": True},
                           "EngineConfig.rotary_in_attention on (decode steps rotate q/k, store "
                           "K/V and attend in one launch; the default where it applies since "
                           "stop 19, so these rows repeat llmbatch's there)",
                           "the fused rotary runs on CUDA only"),
    # Stop 19: a W-SPEC verify step (k + 1 = 5 tokens at batch 1) replays its graph in 1.39 ms
    # against 0.89 ms for a decode step: the one-token paths (gemv, rotary in attention, the
    # gemv LM head) do not take it, cuBLAS at M = 5 and the unfused launches do. Whether the
    # 16-row skinny kernels serve it better is this row's question (W-SPEC only, ~15 s).
    "skinny-spec": Variant("--skinny-spec", {"skinny_matmul": True},
                           "EngineConfig.skinny_matmul on, W-SPEC only (speculative verify "
                           "steps of k + 1 tokens on the 16-row skinny kernels, not cuBLAS)",
                           "skinny matmul runs on CUDA only", workloads=("W-SPEC",)),
    # A verify step on the H200 took 1.25 ms against 0.876 ms a decode step (cuBLAS at M = 5)
    # and 1.9 ms on the 16-row skinny kernels. This row puts steps of <= 8 tokens on the gemv
    # kernels (gemv_linear's multi-row kernel: each weight tile loaded once for all rows):
    # W-SPEC its question, W-BATCH1 its control (one-token steps: llmbatch's row again).
    "gemv-rows8": Variant("--gemv-rows8", {"gemv_max_rows": 8},
                          "EngineConfig.gemv_max_rows 8, W-SPEC and W-BATCH1 only (steps of "
                          "<= 8 tokens, speculative verify steps, on the multi-row gemv "
                          "kernel, not cuBLAS)", "the gemv layers run on CUDA only",
                          workloads=("W-SPEC", "W-BATCH1")),
    # Stop 20: a batch-1 512-token prefill was host-bound (eager_launch_s == eager_step_s,
    # 9-15 ms to enqueue ~3 ms of kernels): TTFT, and ~8 % of W-SPEC b=1's wall. This row
    # replays one-sequence prefills from CUDA graphs (runtime/prefill_graphs.py): W-BATCH1's
    # TTFT its question (the table's cell shows it), W-SPEC the ratio it moves.
    "prefill-graphs": Variant("--prefill-graphs", {"prefill_graph_max_tokens": 512},
                              "EngineConfig.prefill_graph_max_tokens 512, W-BATCH1 and W-SPEC "
                              "only (one-sequence prefills of <= 512 tokens replay CUDA graphs)",
                              "CUDA graphs run on CUDA only",
                              workloads=("W-BATCH1", "W-SPEC")),
    # Stop 23: decode / verify graphs of <= 16 tokens run the LM head and the greedy argmax
    # too (runtime/graph_logits.py, EngineConfig.graph_logits, default on): three device
    # operations fewer between two replays at batch 1. This row is the engine without it,
    # the A/B of that default: W-BATCH1's TPOT and W-SPEC b=1's ratios its question.
    "no-graph-logits": Variant("--no-graph-logits", {"graph_logits": False},
                               "EngineConfig.graph_logits off, W-BATCH1 and W-SPEC only (the "
                               "LM head and greedy argmax run eagerly after each decode graph "
                               "replay, as before stop 23)", "CUDA graphs run on CUDA only",
                               workloads=("W-BATCH1", "W-SPEC")),
    "l2prefetch": Variant("--l2-prefetch", {"l2_prefetch": True},
                          "EngineConfig.l2_prefetch on (steps of <= 16 tokens touch the qkv and "
                          "o_proj weights into L2 on a side stream ahead of use)",
                          "L2 prefetch runs on CUDA only"),
}


def add_variant_flags(parser, workloads: str) -> None:
    for name, v in AB_VARIANTS.items():
        runs = "/".join(v.workloads) if v.workloads else workloads
        parser.add_argument(v.flag, action="store_true",
                            help=f"also run {runs} with {v.what} as system llmbatch-{name}"
                                 + ("; CUDA only" if v.cpu_skip else ""))


def wanted_variants(args) -> list[str]:
    """The variants whose flag is set, in table order."""
    return [name for name, v in AB_VARIANTS.items() if getattr(args, v.dest)]
