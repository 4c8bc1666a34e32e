"""Named entities as a pipeline: all-MiniLM-L6-v2 on the generated NER set, fine-tuned, then adversarially,
then exported; every stage is measured by entity F1 on the same held-out sentences.

    python experiments/ner_data.py --out runs/ner_data
    jaxopt-llm pipeline run experiments/pipelines/ner.py

data (300 test / 100 dev sentences held out of train.conll) -> tagger (token classification, the config
experiments/configs/ner_tiny.py; its eval is eval.conll, whose names training never shows) -> robust
(adversarial fine-tuning from it) -> deploy (jax.export artifact). The report is runs/ner/report.html.
"""

from jaxopt_llm.config import PACKAGED_MINILM
from jaxopt_llm.pipeline import Pipeline, Split, Stage

COMMON = {"train.log_every": 50, "train.seed": 0}


def get_pipeline() -> Pipeline:
    return Pipeline(
        name="ner",
        data=Split(source="runs/ner_data/train.conll", task="token-classification", test_size=300, dev_size=100,
                   seed=0),
        examples=("Grace Okafor flew to Lisbon for Oxfam", "the train to Kyiv was late"),
        max_length=32, batch_size=32,
        stages=(
            Stage("tagger", "finetune", config="experiments/configs/ner_tiny.py", model=PACKAGED_MINILM,
                  overrides={**COMMON, "train.steps": 200}),
            Stage("robust", "adversarial", config="experiments/configs/ner_tiny.py", model="@tagger",
                  overrides={**COMMON, "train.steps": 40, "train.warmup_steps": 0, "adversarial.epsilon": 0.005}),
            Stage("deploy", "export", model="@robust"),
        ))
