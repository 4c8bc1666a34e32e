"""Extractive QA with all-MiniLM-L6-v2 on the generated set (three facts per context, the question asks for
one; eval answers unseen in training), a few minutes on 2 CPU cores; contexts longer than the 128-token window
are read in windows overlapping by 32 tokens.

    python experiments/qa_data.py --out runs/qa_data
    jaxopt-llm finetune --config experiments/configs/qa_tiny.py --workdir runs/qa_tiny
    jaxopt-llm predict qa --model runs/qa_tiny --data runs/qa_data/dev.json > runs/qa_tiny/answers.jsonl
"""

from jaxopt_llm.config import PACKAGED_MINILM, Config, DataConfig, ModelConfig, TrainConfig
from jaxopt_llm.steps.qa import QAOptions


def get_config() -> Config:
    return Config(
        task="question-answering",
        task_options=QAOptions(stride=32, max_answer_length=30),
        model=ModelConfig(name_or_path=PACKAGED_MINILM),
        data=DataConfig(train_file="runs/qa_data/train.json", eval_file="runs/qa_data/dev.json", max_length=128),
        train=TrainConfig(batch_size=16, steps=300, learning_rate=1e-4, warmup_steps=30, weight_decay=0.01,
                          log_every=50, eval_every=100, checkpoint_every=100, seed=0),
    )
