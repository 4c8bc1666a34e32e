"""The plan of a pipeline: stages in run order, each stage's key (a hash of its settings, its config file's
text, its parents' keys and the data's) and what to do with its folder (skip, run, resume, rerun)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from jaxopt_llm import paths
from jaxopt_llm.pipeline import stages as stages_lib
from jaxopt_llm.pipeline.spec import DONE, KEY_VERSION, SPLIT_TASKS, Pipeline, PipelineError, Stage, parents, read_json
from jaxopt_llm.pipeline.split import source_file


def order(pipeline: Pipeline) -> list[Stage]:
    """Stages in run order (file order where the references allow); every error before anything runs."""
    kinds = stages_lib.kinds()
    if pipeline.data.task not in SPLIT_TASKS:
        raise PipelineError(f"Split.task={pipeline.data.task!r}: use one of {', '.join(SPLIT_TASKS)}.")
    if not pipeline.stages:
        raise PipelineError(f"pipeline {pipeline.name!r} has no stages: give stages=(Stage(...), ...).")
    names = [s.name for s in pipeline.stages]
    for stage in pipeline.stages:
        if stage.name == "data" or not stage.name.replace("_", "").replace("-", "").isalnum():
            raise PipelineError(f"stage name {stage.name!r}: use letters, digits, - and _ ('data' is the split).")
        if names.count(stage.name) > 1:
            raise PipelineError(f"stage {stage.name!r} is defined twice; give each stage its own name.")
        if stage.kind not in kinds:
            raise PipelineError(f"stage {stage.name!r}: kind {stage.kind!r} is unknown; use one of {', '.join(kinds)}.")
        kind = kinds[stage.kind]
        for parent in parents(stage)[1:]:
            if parent not in names:
                raise PipelineError(f"stage {stage.name!r} names '@{parent}', which is not a stage of this pipeline "
                                    f"(stages: {', '.join(names)}).")
            if parent == stage.name:
                raise PipelineError(f"stage {stage.name!r} names itself ('@{parent}').")
            if kinds[next(s for s in pipeline.stages if s.name == parent).kind].artifact:
                raise PipelineError(f"stage {stage.name!r} starts from '@{parent}', an export artifact; start it "
                                    "from the stage the export was made of.")
        if pipeline.data.task not in kind.split_tasks:
            raise PipelineError(f"stage {stage.name!r}: a {stage.kind} stage works on {' or '.join(kind.split_tasks)} "
                                f"data, and this pipeline's split is {pipeline.data.task} (Split.task).")
        if kind.needs_model and not stage.model:
            raise PipelineError(f"stage {stage.name!r} ({stage.kind}) needs model='@<stage>'.")
        if kind.check is not None:
            kind.check(stage)
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


def specs(pipeline: Pipeline, stages: list[Stage]) -> dict[str, dict]:
    """What each stage's key hashes: its settings, its config file's text, its parents' keys."""
    split = dataclasses.asdict(pipeline.data)
    if split["task"] == "classification":  # the default keeps the keys of pipelines written before it existed
        split.pop("task")
    out = {"data": {"version": KEY_VERSION, "split": split, "source_sha256": paths.sha256(source_file(pipeline.data))}}
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
    if paths.Path(workdir).exists() and not paths.Path(workdir).is_dir():
        raise PipelineError(f"--workdir {str(workdir)!r} is a file; pass a folder (new or a pipeline's).")
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
    _check_configs(stages, {n: workdir / f"{n}-{key(all_specs[n])}" for n in names}, pipeline.data.task)
    previous = read_json(workdir / "pipeline.json") or {}
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
            changed = _changed(read_json(workdir / last["folder"] / "stage.json") or {}, spec)
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


def _check_configs(stages: list[Stage], folders: dict[str, Path], split_task: str) -> None:
    """Every training stage's config loads and validates (parents stand in by their future folders)."""
    from jaxopt_llm import config as config_lib

    for stage in stages:
        if not stages_lib.get(stage.kind).configured:
            continue
        try:
            stages_lib.config_of(stage, folders, ["negative", "positive"], split_task)
        except config_lib.ConfigError as err:
            raise PipelineError(f"stage {stage.name!r}: {err}") from None


def _ancestors(name: str, stages: list[Stage]) -> set[str]:
    by_name = {s.name: s for s in stages}
    out, todo = set(), list(parents(by_name[name])) if name in by_name else []
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += parents(by_name[n]) if n in by_name else []
    return out
