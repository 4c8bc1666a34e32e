"""Distil the MiniLM fine-tuned by tweets_tiny.py (run it first) into a 2-layer student taken from every 3rd
teacher layer, on the same tweets, steps and seed. CPU, a few minutes.

    jaxopt-llm distill --config experiments/configs/tweets_distill_tiny.py --workdir runs/tweets_kd2

Variants used for the README table (same budget):
    ... distill.student_layers=3 --workdir runs/tweets_kd3
    ... distill.alpha=0 distill.init=random --workdir runs/tweets_scratch2   (labels only, from scratch)
"""

import dataclasses
import importlib.util
from pathlib import Path

from jaxopt_llm.config import Config
from jaxopt_llm.steps.distill import Distillation


def get_config() -> Config:
    spec = importlib.util.spec_from_file_location("tweets_tiny", Path(__file__).with_name("tweets_tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    config = base.get_config()
    return dataclasses.replace(config, train=dataclasses.replace(config.train, learning_rate=1e-4),
                               method="distill", options=Distillation(teacher="runs/tweets_tiny", student_layers=2,
                                                                      init="teacher-layers", alpha=0.5, temperature=2.0))
