"""Job layer: job-file schema and validation, orchestration, statistics.

Only `runner` (through the engine it creates) touches torch; the schema and stats import fast.
"""
