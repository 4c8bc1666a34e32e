"""Fine-tune all-MiniLM-L6-v2 on your own CSV: a text column and a label column (names, or ids 0..n-1).

    jaxopt-llm finetune --config experiments/configs/own_csv.py --workdir runs/mine data.train_file=reviews.csv
"""

from jaxopt_llm.config import PACKAGED_MINILM, Config, DataConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(name_or_path=PACKAGED_MINILM),  # or a hub id, an HF folder, a run folder
        data=DataConfig(train_file="reviews.csv", text_column="text", label_column="label", max_length=128,
                        eval_fraction=0.1),  # or eval_file="dev.csv"
        train=TrainConfig(steps=500, batch_size=32, learning_rate=5e-5, warmup_steps=50, seed=0),
    )
