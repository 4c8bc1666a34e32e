"""Continue masked-LM + next-sentence pretraining of MiniLM on the packaged tweets' text (CPU, minutes).

    jaxopt-llm pretrain --config experiments/configs/mlm_tiny.py --workdir runs/mlm_tiny

MiniLM ships no MLM head: it starts freshly initialised (a warning names it). Base variant: mlm_base.py.
"""

from jaxopt_llm.config import PACKAGED_MINILM, PACKAGED_TWEETS, Config, DataConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="masked-lm",
        model=ModelConfig(name_or_path=PACKAGED_MINILM),
        data=DataConfig(dataset=PACKAGED_TWEETS, text_column="text", max_length=64, max_train_examples=4000,
                        mlm_probability=0.15, max_predictions_per_seq=10, whole_word_masking=True,
                        next_sentence=True),
        train=TrainConfig(batch_size=32, steps=200, learning_rate=1e-4, warmup_steps=20, log_every=10,
                          eval_every=100, checkpoint_every=100, seed=0),
    )
