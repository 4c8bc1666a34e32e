"""A 5-member deep ensemble of all-MiniLM-L6-v2 on the same 4,000 tweets, steps and settings as tweets_tiny.py:
members differ by seed (classifier head, dropout, data order) and train in one compiled step, all five in one
vmapped pass as when README's ensemble table was measured (the CPU default, one member per pass, is ~13 %
faster and equal to rounding). CPU, about 5x the single run's time.

    jaxopt-llm ensemble --config experiments/configs/tweets_ensemble_tiny.py --workdir runs/tweets_ens5

Then: python experiments/ensemble_table.py (one model, + temperature, the ensemble, the ensemble distilled).
"""

import dataclasses
import importlib.util
from pathlib import Path

from jaxopt_llm.config import Config
from jaxopt_llm.steps.ensemble import EnsembleOptions


def get_config() -> Config:
    spec = importlib.util.spec_from_file_location("tweets_tiny", Path(__file__).with_name("tweets_tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return dataclasses.replace(base.get_config(), method="ensemble",
                               options=EnsembleOptions(members=5, members_per_pass=5))
