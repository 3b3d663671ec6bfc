"""The four-stage CPI-FT pipeline, its baselines, the built-in demo and the report.

    probe → core → group → stages → fuse → consolidate → eval → report

``cpift run CONFIG.yaml`` / ``cpift demo`` on the command line; from Python::

    from cpift_fast.pipeline import load_config, run_pipeline
    results = run_pipeline(load_config("examples/demo.yaml"), runs_dir="runs")

Modules: config (YAML + validation), model (tiny Llama / any causal LM, tokenizers), tasks
(synthetic suite, GSM8K, CodeAlpaca), data (tokenisation, loss on responses), train (Trainer +
MaskedAdamW), freeze (the run-time freeze check), evaluate (greedy decoding + metrics), run
(resumable stage cache), stages, methods (CPI-FT and baselines), driver, report.
"""

from .config import DEMO, Config, ConfigError, load_config
from .driver import run_pipeline
from .freeze import FreezeGuard, FrozenDriftError
from .methods import METHODS

__all__ = ["DEMO", "Config", "ConfigError", "FreezeGuard", "FrozenDriftError", "METHODS", "load_config",
           "run_pipeline"]
