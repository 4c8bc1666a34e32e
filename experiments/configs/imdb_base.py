"""Fine-tune bert-base-uncased on IMDB reviews (25k train / 25k test, 2 classes, 512 tokens) on a TPU VM.

    jaxopt-llm finetune --config experiments/configs/imdb_base.py --workdir gs://BUCKET/runs/imdb_base

Tiny variant (CPU): experiments/configs/tweets_tiny.py.
"""

from jaxopt_llm.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="classification",
        model=ModelConfig(name_or_path="bert-base-uncased", dtype="bfloat16"),
        data=DataConfig(dataset="imdb", text_column="text", label_column="label", eval_split="test", max_length=512),
        train=TrainConfig(batch_size=64, steps=4000, learning_rate=2e-5, warmup_steps=400, weight_decay=0.01,
                          log_every=50, eval_every=1000, eval_batches=100, checkpoint_every=1000, seed=0),
        parallel=ParallelConfig(backend="jit"),
    )
