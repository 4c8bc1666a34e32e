"""Extractive QA as a pipeline: all-MiniLM-L6-v2 on the generated SQuAD-format set, fine-tuned and exported;
every stage is measured by exact match and F1 (the SQuAD script's) on the same held-out questions.

    python experiments/qa_data.py --out runs/qa_data
    jaxopt-llm pipeline run experiments/pipelines/qa.py

data (300 test / 100 dev questions held out of train.json) -> reader (the config experiments/configs/qa_tiny.py)
-> deploy (jax.export artifact). The report is runs/qa/report.html.
"""

from jaxopt_llm.config import PACKAGED_MINILM
from jaxopt_llm.pipeline import Pipeline, Split, Stage


def get_pipeline() -> Pipeline:
    return Pipeline(
        name="qa",
        data=Split(source="runs/qa_data/train.json", task="question-answering", test_size=300, dev_size=100, seed=0),
        max_length=128, batch_size=32,
        stages=(
            Stage("reader", "finetune", config="experiments/configs/qa_tiny.py", model=PACKAGED_MINILM,
                  overrides={"train.log_every": 50, "train.seed": 0}),
            Stage("deploy", "export", model="@reader"),
        ))
