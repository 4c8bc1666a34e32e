"""Adversarially fine-tune all-MiniLM-L6-v2 on the same 4,000 tweets, steps and seed as tweets_tiny.py
(PGD in an L-inf ball on the word embeddings, 1 inner step, half clean / half adversarial loss), then
compare both models under attack. CPU, about twice the clean run's time.

    jaxopt-llm adversarial --config experiments/configs/tweets_adversarial_tiny.py --workdir runs/tweets_adv_tiny
    jaxopt-llm sweep robustness --model runs/tweets_tiny --model runs/tweets_adv_tiny \
        --config experiments/configs/tweets_tiny.py --steps 5 --plot robustness.png eps=0,0.005,0.01,0.02,0.04
"""

import dataclasses
import importlib.util
from pathlib import Path

from jaxopt_llm.config import Config
from jaxopt_llm.steps.adversarial import Adversary


def get_config() -> Config:
    spec = importlib.util.spec_from_file_location("tweets_tiny", Path(__file__).with_name("tweets_tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    return dataclasses.replace(base.get_config(), method="adversarial", options=Adversary(
        method="pgd", norm="linf", epsilon=0.01, inner_steps=1, init="zero", clean_weight=0.5))
