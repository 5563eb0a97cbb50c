"""The inference runtime: scheduler, paged KV cache, model runner, sampler.

Pure-Python modules (request, sampling_params, block_manager, scheduler, planner) never
import torch; they are tested in milliseconds.
"""
