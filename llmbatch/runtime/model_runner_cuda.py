"""ModelRunner's CUDA-only fast paths that check themselves at start-up, mixed into ModelRunner:
the Triton greedy argmax (its self-check against torch.argmax), the decode/verify CUDA graphs
(capture, each graph's first replay checked against the eager forward in cuda_graphs.py) and
the one-sequence prefill graphs (prefill_graphs.py, checked the same way). Each one, failing,
is turned off with its reason kept for the engine's stats (triton_argmax_error,
cuda_graph_error, prefill_graph_error) and logged; the job goes on without it.
"""

from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)


class CudaFastPathsMixin:
    """Needs the ModelRunner's config, device, model, kv_caches, attn_backend, tp_size,
    max_model_len and block_size (the graphs are captured after the KV pool is allocated)."""

    def _check_triton_argmax(self) -> Optional[str]:
        """On CUDA, the greedy argmax's Triton path (greedy_argmax.TRITON_ARGMAX) must equal
        torch.argmax on this GPU (triton_argmax.self_check); if not, it is turned off for the
        process and the reason reported (stats()["triton_argmax_error"]), not the job failed."""
        from llmbatch.runtime import greedy_argmax

        if self.device.type != "cuda" or not greedy_argmax.TRITON_ARGMAX:
            return None
        try:
            from llmbatch.runtime.triton_argmax import self_check
        except ImportError as exc:
            error = f"triton does not import: {exc}"
        else:
            error = self_check(self.device)
        if error is not None:
            greedy_argmax.TRITON_ARGMAX = False
            logger.warning("Triton greedy argmax turned off (torch.argmax instead): %s", error)
        return error

    def _maybe_capture_decode_graphs(self):
        """Decode and verify CUDA graphs (runtime/cuda_graphs.py) on CUDA with the triton backend,
        single-rank (collectives are not captured yet). Quantized models too: bitsandbytes'
        kernels launch on the current stream with torch-allocated outputs; each graph's first
        replay is checked against the eager forward, and any failure falls back to eager."""
        cfg = self.config
        if not (cfg.cuda_graphs and self.device.type == "cuda" and self.attn_backend.name ==
                "triton" and self.tp_size == 1):
            return None
        from llmbatch.runtime.cuda_graphs import DecodeGraphRunner
        from llmbatch.runtime.graph_logits import LOGITS_MAX_ROWS

        # First with the LM head and greedy argmax in the small graphs (graph_logits.py); if
        # that capture fails, once more without them, so a failing tail costs only itself.
        rows = LOGITS_MAX_ROWS if getattr(cfg, "graph_logits", True) else 0
        while True:
            try:
                # Verify steps (k drafts + 1 per sequence) get graphs too, at the sizes where
                # the engine speculates at all: captured whether or not a proposer is
                # configured, since one can be installed later (Engine.set_proposer); a few
                # small graphs, ~0.3 s.
                return DecodeGraphRunner(self.model, self.kv_caches, self.attn_backend,
                                         max_num_seqs=cfg.max_num_seqs,
                                         max_model_len=self.max_model_len,
                                         block_size=self.block_size, device=self.device,
                                         verify_tokens=cfg.num_speculative_tokens + 1,
                                         verify_max_num_seqs=cfg.speculative_max_num_seqs,
                                         logits_max_rows=rows)
            except Exception as exc:  # a capture failure must not lose the job
                error = f"{type(exc).__name__}: {exc}"
                del exc   # its traceback holds the failed runner and its graphs' memory pool
                torch.cuda.synchronize(self.device)
                if rows:
                    # The failed attempt's graphs (all sizes, captured largest first) are
                    # garbage now: free their pool before the retry captures a second set.
                    gc.collect()
                    torch.cuda.empty_cache()
                    self.graph_logits_error = error
                    logger.warning("CUDA graphs with the LM head inside failed, capturing "
                                   "them without it: %s", error)
                    rows = 0
                    continue
                self.cuda_graph_error = error   # run eagerly, loudly
                logger.warning("CUDA graph capture failed, decoding eagerly: %s", error)
                return None

    def _maybe_capture_prefill_graphs(self):
        """Prefill CUDA graphs (runtime/prefill_graphs.py) where the decode graphs are, when
        EngineConfig.prefill_graph_max_tokens asks for them; buckets up to that many tokens,
        the token budget and max_model_len, whichever is least."""
        cfg = self.config
        want = getattr(cfg, "prefill_graph_max_tokens", 0)
        if not want:
            return None
        if self.graph_runner is None:
            logger.info("prefill_graph_max_tokens ignored: needs CUDA graphs (cuda_graphs on "
                        "CUDA with the triton attention backend, tensor_parallel_size 1)")
            return None
        from llmbatch.runtime.config import MIN_PREFILL_GRAPH_TOKENS
        from llmbatch.runtime.prefill_graphs import PrefillGraphRunner

        max_tokens = min(want, cfg.max_num_batched_tokens, self.max_model_len)
        if max_tokens < MIN_PREFILL_GRAPH_TOKENS:
            logger.info("prefill_graph_max_tokens ignored: the token budget or max_model_len "
                        "is under %d", MIN_PREFILL_GRAPH_TOKENS)
            return None
        try:
            return PrefillGraphRunner(self.model, self.kv_caches, self.attn_backend,
                                      max_tokens=max_tokens, max_model_len=self.max_model_len,
                                      block_size=self.block_size, device=self.device)
        except Exception as exc:  # as for the decode graphs: run these steps eagerly, loudly
            self.prefill_graph_error = f"{type(exc).__name__}: {exc}"
            logger.warning("prefill CUDA graph capture failed, prefilling eagerly: %s",
                           self.prefill_graph_error)
            torch.cuda.synchronize(self.device)
            return None
