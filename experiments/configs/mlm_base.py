"""Masked-LM + NSP pretraining of bert-base-uncased from its checkpoint on your text files, TPU VM.

    jaxopt-llm pretrain --config experiments/configs/mlm_base.py --workdir gs://BUCKET/runs/mlm_base \
        data.train_file=/data/corpus.txt

One sentence per line, blank lines between documents. Tiny variant (CPU): experiments/configs/mlm_tiny.py.
"""

from jaxopt_llm.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="masked-lm",
        model=ModelConfig(name_or_path="bert-base-uncased", dtype="bfloat16"),
        data=DataConfig(train_file="corpus.txt", max_length=128, max_predictions_per_seq=20,
                        whole_word_masking=True, next_sentence=True, eval_fraction=0.01),
        train=TrainConfig(batch_size=256, steps=10000, learning_rate=1e-4, warmup_steps=1000, weight_decay=0.01,
                          log_every=100, eval_every=1000, checkpoint_every=1000, seed=0),
        parallel=ParallelConfig(backend="jit", fsdp=False),
    )
