"""Fine-tune bert-base-uncased on GLUE SST-2 (67k sentences, 2 classes) on a TPU VM (v4-8 or larger).

    jaxopt-llm finetune --config experiments/configs/sst2_base.py --workdir gs://BUCKET/runs/sst2_base

Tiny variant (CPU, no hub needed: the packaged MiniLM and tweets): experiments/configs/tweets_tiny.py.
"""

from jaxopt_llm.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="classification",
        model=ModelConfig(name_or_path="bert-base-uncased", dtype="bfloat16"),
        data=DataConfig(dataset="glue/sst2", text_column="sentence", label_column="label", eval_split="validation",
                        max_length=128),
        train=TrainConfig(batch_size=256, steps=2000, learning_rate=5e-5, warmup_steps=200, weight_decay=0.01,
                          log_every=50, eval_every=500, checkpoint_every=500, seed=0),
        parallel=ParallelConfig(backend="jit"),
    )
