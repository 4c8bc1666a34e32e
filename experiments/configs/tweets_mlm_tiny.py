"""Domain-adaptive masked-LM training of all-MiniLM-L6-v2 on the packaged tweets' text: trains the MLM head
MiniLM lacks (transform + LayerNorm + bias; the decoder is tied to MiniLM's real word embeddings), the
starting point of prompt (cloze) classification. 2 CPU cores: about 40 minutes (2.4 s per step).

    jaxopt-llm pretrain --config experiments/configs/tweets_mlm_tiny.py --workdir runs/tweets_mlm

Unlabelled text only: the first 20,000 tweets of the file (labels are never read). Base variant: mlm_base.py.
"""

from jaxopt_llm.config import PACKAGED_MINILM, PACKAGED_TWEETS, Config, DataConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="masked-lm",
        model=ModelConfig(name_or_path=PACKAGED_MINILM),
        data=DataConfig(dataset=PACKAGED_TWEETS, text_column="text", max_length=64, max_train_examples=20000,
                        eval_fraction=0.02, mlm_probability=0.15, max_predictions_per_seq=10,
                        whole_word_masking=True),
        train=TrainConfig(batch_size=32, steps=1000, learning_rate=1e-4, warmup_steps=100, log_every=20,
                          eval_every=250, checkpoint_every=250, seed=0),
    )
