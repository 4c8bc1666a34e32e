"""Named entities (PER, LOC, ORG; IOB2) with all-MiniLM-L6-v2 on the generated set, about two minutes on 2 CPU
cores; the eval sentences name people, places and organisations the training sentences never show.

    python experiments/ner_data.py --out runs/ner_data
    jaxopt-llm finetune --config experiments/configs/ner_tiny.py --workdir runs/ner_tiny
    jaxopt-llm predict ner --model runs/ner_tiny "Grace Okafor flew to Lisbon for Oxfam"
"""

from jaxopt_llm.config import PACKAGED_MINILM, Config, DataConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        task="token-classification",
        model=ModelConfig(name_or_path=PACKAGED_MINILM),
        data=DataConfig(train_file="runs/ner_data/train.conll", eval_file="runs/ner_data/eval.conll", max_length=32),
        train=TrainConfig(batch_size=32, steps=300, learning_rate=1e-4, warmup_steps=30, weight_decay=0.01,
                          log_every=50, eval_every=100, checkpoint_every=100, seed=0),
    )
