"""Multi-step pipelines: pretrain -> fine-tune -> optimise -> deploy, one command, prediction at every step.

A pipeline file is a Python file whose docstring starts with its command and which defines
`get_pipeline() -> Pipeline`. Its first stage, `data`, is implicit: it splits the labelled source into
train / dev / test once (seeded); every later stage trains on train.csv, calibrates on dev.csv and is
measured on the same test.csv and example texts.

Each stage runs in `<workdir>/<name>-<key>`, the key a hash of the stage's settings (its config file's
text included), its parents' keys and the data's. `done.json` is written last, atomically: a stage with
it is skipped, a folder without it is resumed (training resumes exactly from its checkpoints), a changed
stage gets a new key -- a new folder -- and so do all its descendants.

Stage values that start with "@" name an earlier stage's model: `model="@finetune"`,
`overrides={"distill.teacher": "@ensemble"}`.

The package by concern: `spec` (the file's dataclasses), `plan` (order and keys), `stages` (the registry of
stage kinds), `split`, `measure`, `runner`, `report`.
"""

from jaxopt_llm.pipeline.measure import TIMED_BATCHES, measure
from jaxopt_llm.pipeline.plan import key, order, plan, specs
from jaxopt_llm.pipeline.runner import run
from jaxopt_llm.pipeline.spec import DONE, KEY_VERSION, Pipeline, PipelineError, Split, Stage, load, parents
from jaxopt_llm.pipeline.stages import StageKind, register

__all__ = ["DONE", "KEY_VERSION", "TIMED_BATCHES", "Pipeline", "PipelineError", "Split", "Stage", "StageKind", "key",
           "load", "measure", "order", "parents", "plan", "register", "run", "specs"]
