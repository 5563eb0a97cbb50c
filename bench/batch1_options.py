"""The rows of bench/bench_batch1.py: each option as (label, apply(engine, device) -> detail,
undo(engine)), and the combined-winners row built from the finished single rows.
bench/bench_batch1.py's docstring says what each option does; options() says which run by
default and which only with --all."""

from __future__ import annotations


DEFAULTS = "defaults"
WINNERS = "winners combined"
WIN_MARGIN = 0.01   # a winner's TPOT is at most (1 - WIN_MARGIN) x the first row's
# Options that replace each other: only the fastest of a group joins the combined row.
EXCLUSIVE_GROUPS = ("L2 prefetch", "attention splits", "attention key tile")


def options(all_rows: bool = False):
    """(label, apply(engine, device) -> str detail, undo(engine)) per row, in order. By default
    the rows still open (gemv, its weight prefetch, stop 19's gemv tile table, PDL, rotary in
    attention) between the two defaults rows; with all_rows (--all) also those measured slower
    or equal on an H200 in stops 13 and 17 (L2 prefetch plans, split reduce fused, argmax in
    torch, rope table off, attention splits and key tiles, sync scheduling): 16 rows did not
    fit the sweep's 90 s in stop 17, whose closing defaults row (the noise check) was cut."""
    import torch

    from llmbatch.runtime.models.llama_prefetch import (PrefetchPlan, disable_l2_prefetch,
                                                        enable_l2_prefetch)

    def prefetch(**fields):
        plan = PrefetchPlan(**fields)

        def apply(engine, device):
            n = enable_l2_prefetch(engine.runner.model, device, plan=plan)
            return f"{n} weights touched"
        return (f"L2 prefetch {plan.label}", apply,
                lambda engine: disable_l2_prefetch(engine.runner.model))

    def rope_rotaries(engine):
        from llmbatch.runtime.layers.rotary import RotaryEmbedding

        return [m for m in engine.runner.model.modules() if isinstance(m, RotaryEmbedding)]

    saved = {}

    def rope_off(engine, device):
        for r in rope_rotaries(engine):
            saved[id(r)], r.table = r.table, None
        return "cos/sin computed per step"

    def rope_back(engine):
        for r in rope_rotaries(engine):
            r.table = saved.pop(id(r), r.table)

    def fused_reduce(on: bool):
        def switch(engine, device=None):
            engine.runner.attn_backend.fused_split_reduce = on
            return ""
        return switch

    def argmax_in_torch(engine, device):
        from llmbatch.runtime import greedy_argmax

        saved["argmax"], greedy_argmax.TRITON_ARGMAX = greedy_argmax.TRITON_ARGMAX, False
        return ""

    def argmax_back(engine):
        from llmbatch.runtime import greedy_argmax

        greedy_argmax.TRITON_ARGMAX = saved.pop("argmax", greedy_argmax.TRITON_ARGMAX)

    def attention(field: str, value: int):
        def apply(engine, device=None):
            backend = engine.runner.attn_backend
            saved[field] = getattr(backend, field, None)
            setattr(backend, field, value)
            return ""

        def undo(engine):
            setattr(engine.runner.attn_backend, field, saved.pop(field, None))
        label = {"num_kv_splits": "splits", "tile_n": "key tile"}[field]
        return f"attention {label} {value}", apply, undo

    def sync(engine, device):
        saved["async"], engine.async_scheduling = engine.async_scheduling, False
        return ""

    def sync_back(engine):
        engine.async_scheduling = saved.pop("async", engine.async_scheduling)

    # PDL and the gemv layers are on by default on sm_90+ since stop 17 (auto in EngineConfig),
    # the gemv weight prefetch ("tile") and rotary in attention since stop 19 (measured on an
    # H200 there: 0.948 vs 0.972 ms, 1.025x, same tokens; 0.958 ms, 1.015x), off elsewhere or
    # when the engine was built with them off: their rows FLIP the engine's state (the detail
    # says which way) and put it back exactly after.
    def llama_models(engine):
        from llmbatch.runtime.models.llama import LlamaModel

        return [m for m in engine.runner.model.modules() if isinstance(m, LlamaModel)]

    def gemv_on(engine) -> bool:
        """The engine's one-token steps run on the gemv layers (their counters are set)."""
        return any(getattr(m, "skinny_gemv_counters", None) is not None
                   for m in llama_models(engine))

    skinny_fields = ("use_skinny_matmul", "skinny_max_tokens", "skinny_pdl",
                     "skinny_gemv_counters")

    # A stack, not one slot: the gemv and PDL flips both save these fields, and the combined
    # row applies both then undoes them in reverse; with one slot the second save overwrote the
    # first, so the gemv undo found nothing and left the rows after it with the gemv flipped.
    skinny_stack: list[list] = []

    def save_skinny(engine):
        from llmbatch.runtime.layers.embedding import ParallelLMHead

        state = [(m, {f: getattr(m, f, None) for f in skinny_fields})
                 for m in llama_models(engine)]
        state += [(h, {"use_gemv": h.use_gemv}) for h in engine.runner.model.modules()
                  if isinstance(h, ParallelLMHead)]
        skinny_stack.append(state)

    def restore_skinny(engine):
        for m, fields in (skinny_stack.pop() if skinny_stack else []):
            for f, v in fields.items():
                setattr(m, f, v)

    def pdl_flip(engine, device):
        from llmbatch.runtime import pdl

        saved["pdl"] = pdl.enabled()
        save_skinny(engine)
        if saved["pdl"]:
            pdl.set_enabled(False)
        elif device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            return "needs sm_90 CUDA: not applied"
        else:
            pdl.set_enabled(True)
        for m in llama_models(engine):   # the skinny/gemv launches read their module's flag
            if m.use_skinny_matmul:
                m.skinny_pdl = pdl.enabled()
        return "off (engine default on)" if saved["pdl"] else "on (engine default off)"

    def pdl_back(engine):
        from llmbatch.runtime import pdl

        pdl.set_enabled(saved.pop("pdl", False))
        restore_skinny(engine)

    def gemv_flip(engine, device):
        from llmbatch.runtime import pdl
        from llmbatch.runtime.models.llama_skinny import (disable_skinny_matmul,
                                                          enable_skinny_matmul)

        save_skinny(engine)
        if gemv_on(engine):
            disable_skinny_matmul(engine.runner.model)
            return "off (engine default on)"
        if device.type != "cuda":   # the interpreter would run it on the CPU: not a figure
            return "needs CUDA: not applied"
        if not enable_skinny_matmul(engine.runner.model, pdl=pdl.enabled(), gemv_rows=True,
                                    small_steps=False):
            return "not applicable (quantized, sharded or not Llama-family): not applied"
        return "on (engine default off)"

    def gemv_prefetch(switch: str):
        """A row that flips one of layers/gemv.py's weight-prefetch switches
        (set_weight_prefetch: the first tile into registers, on by default from stop 19 where
        the gemv layers are on; set_weight_prefetch_l2: the slice into L2, off by default):
        off where the engine has it on, else on; the detail says which way."""
        def apply(engine, device):
            from llmbatch.runtime.layers import gemv

            if not hasattr(gemv, f"set_{switch}"):
                return f"layers/gemv.py has no {switch}: not applied"
            saved[switch] = getattr(gemv, f"{switch}_enabled")()
            getattr(gemv, f"set_{switch}")(not saved[switch])
            if not gemv_on(engine):
                return "the gemv layers are off: no effect"
            return "off (engine default on)" if saved[switch] else "on (engine default off)"

        def undo(engine):
            from llmbatch.runtime.layers import gemv

            if switch in saved:
                getattr(gemv, f"set_{switch}")(saved.pop(switch))
        return apply, undo

    def gemv_tiles_stop17(engine, device):
        """pick_config's table swapped for stop 17's single row (16 x 512, 4 warps, no split,
        3 stages, every shape) against stop 19's per-shape rows. gemv_linear picks a config at
        every launch, so the graphs bench_batch1 recaptures after this take it; the counters
        the gemv layers sized at enable time are unused (split 1)."""
        from llmbatch.runtime.layers import gemv_config

        saved["gemv_table"] = gemv_config.set_config_table(gemv_config.STOP17_TABLE)
        detail = "stop 17's table: 16x512 w4 p3 on every shape"
        return detail if gemv_on(engine) else detail + "; the gemv layers are off: no effect"

    def gemv_tiles_back(engine):
        from llmbatch.runtime.layers import gemv_config

        if "gemv_table" in saved:
            gemv_config.set_config_table(saved.pop("gemv_table"))

    def rotary_attention_flip(engine, device):
        """EngineConfig.rotary_in_attention (measured in stop 19, H200: 0.958 ms, 1.015x; an
        engine default from stop 19): decode steps rotate, store K/V and attend in one launch.
        It rides on the fused rotary (CUDA) and the triton backend; the row flips the
        backend's switch either way (off on a default engine)."""
        from llmbatch.runtime.models.llama import fused_rotary_on

        backend = engine.runner.attn_backend
        if not (hasattr(backend, "rotary_in_attention") and fused_rotary_on(engine.runner.model)):
            return "needs the triton backend and the fused rotary (CUDA): not applied"
        saved["rotary_attn"] = backend.rotary_in_attention
        backend.rotary_in_attention = not saved["rotary_attn"]
        return "off (engine default on)" if saved["rotary_attn"] else "on (engine default off)"

    def rotary_attention_back(engine):
        if "rotary_attn" in saved:
            engine.runner.attn_backend.rotary_in_attention = saved.pop("rotary_attn")

    def graph_logits_flip(engine, device):
        """EngineConfig.graph_logits (an engine default from stop 23, unmeasured then):
        decode graphs of <= 16 tokens run the LM head and greedy argmax too (runtime/
        graph_logits.py). The row flips the config field that the recapture reads."""
        config = engine.runner.config
        saved["graph_logits"] = getattr(config, "graph_logits", True)
        config.graph_logits = not saved["graph_logits"]
        if device.type != "cuda":
            return "needs CUDA graphs: no effect"
        return "off (engine default on)" if saved["graph_logits"] else "on (engine default off)"

    def graph_logits_back(engine):
        if "graph_logits" in saved:
            engine.runner.config.graph_logits = saved.pop("graph_logits")

    nothing = (DEFAULTS, lambda engine, device: "", lambda engine: None)
    # The likeliest gains first: a run cut by its time limit keeps them (JSON after each row).
    open_rows = [("graph logits flipped", graph_logits_flip, graph_logits_back),
                 ("skinny gemv flipped", gemv_flip, restore_skinny),
                 ("gemv weights before the PDL wait", *gemv_prefetch("weight_prefetch")),
                 ("gemv tiles of stop 17", gemv_tiles_stop17, gemv_tiles_back),
                 ("gemv weights into L2 before the PDL wait",
                  *gemv_prefetch("weight_prefetch_l2")),
                 ("PDL flipped", pdl_flip, pdl_back),
                 ("rotary in attention flipped", rotary_attention_flip, rotary_attention_back)]
    if not all_rows:
        return [nothing, *open_rows, nothing]
    return [nothing, *open_rows, prefetch(next_qkv=False), prefetch(),
            ("split reduce fused", fused_reduce(True), fused_reduce(False)),
            ("argmax in torch", argmax_in_torch, argmax_back),
            ("rope table off", rope_off, rope_back),
            prefetch(gate_up_mib=8.0), prefetch(gate_up_mib=16.0),
            attention("num_kv_splits", 8), attention("num_kv_splits", 32),
            attention("tile_n", 32), attention("tile_n", 128),
            ("sync scheduling", sync, sync_back), nothing]


def combine_winners(rows: list, opts: list):
    """The combined-winners option (label, apply, undo) from the finished single-option rows,
    or None when no option won. rows: the JSON rows so far, the first being the defaults;
    opts: the options() entries they ran (matched by label)."""
    base = rows[0].get("tpot_s") if rows and rows[0]["option"] == DEFAULTS else None
    if not base:
        return None
    by_label = {o[0]: o for o in opts}
    best: dict[str, dict] = {}
    for row in rows[1:]:
        tpot = row.get("tpot_s")
        if (row["option"] in (DEFAULTS, WINNERS) or row.get("error") or not tpot
                or row["num_errors"] or row["num_wrong_lengths"]
                or row["option"] not in by_label or tpot > base * (1 - WIN_MARGIN)):
            continue
        group = next((g for g in EXCLUSIVE_GROUPS if row["option"].startswith(g)),
                     row["option"])
        if group not in best or tpot < best[group]["tpot_s"]:
            best[group] = row
    chosen = [by_label[row["option"]] for row in sorted(best.values(),
                                                        key=lambda r: r["tpot_s"])]
    if not chosen:
        return None

    def apply(engine, device):
        details = []
        for label, opt_apply, _ in chosen:
            detail = opt_apply(engine, device)
            details.append(label + (f" ({detail})" if detail else ""))
        return " + ".join(details)

    def undo(engine):
        for _, _, opt_undo in reversed(chosen):
            opt_undo(engine)
    return WINNERS, apply, undo
