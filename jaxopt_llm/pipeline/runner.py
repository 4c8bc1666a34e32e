"""Running a plan: each stage that needs it, in order, on one process or many (a TPU pod slice)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from jaxopt_llm import paths
from jaxopt_llm.paths import write_text
from jaxopt_llm.pipeline import stages as stages_lib
from jaxopt_llm.pipeline.measure import measure
from jaxopt_llm.pipeline.plan import order, plan
from jaxopt_llm.pipeline.spec import DONE, Pipeline, PipelineError, read_json
from jaxopt_llm.pipeline.split import write_split
from jaxopt_llm.runs import write_json


def run(pipeline: Pipeline, workdir: str | Path, *, from_: str | None = None, only: str | None = None,
        force: Sequence[str] = (), dry_run: bool = False, out=None) -> list[dict]:
    """Run the stages that need it (see `plan`); returns the plan rows with each stage's metrics.

    Launched on several processes (jax.distributed: a TPU pod slice), every process runs the same plan:
    training stages train on all of them together; the split, measurement, calibration, export and every
    pipeline file are done and written by process 0 alone, the others waiting at a barrier and reading the
    result back from the (shared) pipeline folder.
    """
    out = sys.stderr if out is None else out  # the stream of the moment, not the one at import
    workdir = paths.Path(workdir)
    rows = plan(pipeline, workdir, from_=from_, only=only, force=force)
    width = max(len(r["name"]) for r in rows)
    if dry_run:
        for r in rows:
            print(f"{r['action']:>7}  {r['name']:<{width}}  {r['kind']:<11} {r['folder']}  ({r['why']})", file=out)
        return rows
    import jax

    from jaxopt_llm.parallel import initialize_distributed, on_main

    initialize_distributed()
    if jax.process_count() > 1:
        for r in rows:
            if r["kind"] != "split" and stages_lib.get(r["kind"]).one_process and r["action"] not in ("skip", "leave"):
                raise PipelineError(f"stage {r['name']!r} ({r['kind']} rounds) runs on one process, and this "
                                    f"pipeline was launched on {jax.process_count()}: run the other stages here, then "
                                    f"`jaxopt-llm pipeline run FILE --only {r['name']}` on one host.")
    out = out if jax.process_index() == 0 else io.StringIO()  # one progress log: process 0's
    on_main("plan", lambda: workdir.mkdir(parents=True, exist_ok=True))  # every process has planned
    stages = {s.name: s for s in order(pipeline)}
    folders = {r["name"]: r["folder"] for r in rows}
    for i, r in enumerate(rows, 1):
        head = f"[{i}/{len(rows)}] {r['name']:<{width}} {r['kind']:<11}"
        if r["action"] in ("skip", "leave"):
            done = read_json(r["folder"] / DONE) or {}
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
                return write_split(pipeline.data, r["folder"])
            model = model or stages_lib.get(r["kind"]).run(stages[r["name"]], r["folder"], folders, pipeline)
            return measure(pipeline, r["kind"], model, folders["data"], r["folder"])

        on_main(f"prepare {r['name']}", prepare)
        model = None
        if r["kind"] != "split" and stages_lib.get(r["kind"]).trains:  # training: every process takes part
            model = stages_lib.get(r["kind"]).run(stages[r["name"]], r["folder"], folders, pipeline)
        on_main(f"finish {r['name']}", lambda: finish(work(model=model)))
        r["metrics"] = json.loads((r["folder"] / DONE).read_text())["metrics"]  # as process 0 wrote it
        print(f"{head} done in {r['metrics']['stage_seconds']:.0f} s{_summary(r['metrics'])}", file=out, flush=True)

    def report() -> None:
        state = {"name": pipeline.name, "stages": {r["name"]: {"key": r["key"], "folder": r["folder"].name,
                                                               "kind": r["kind"]} for r in rows}}
        write_json(workdir / "pipeline.json", state)
        if all(r.get("metrics") is not None for r in rows):
            from jaxopt_llm.pipeline import report as report_lib

            written = report_lib.write(pipeline, workdir, rows)
            print(f"report: {written}\nmodel card: {workdir / 'model_card.md'}", file=out, flush=True)

    on_main("report", report)
    return rows


def _summary(metrics: dict) -> str:
    shown = [f"{k}={metrics[k]:.4f}" for k in ("accuracy", "f1", "ece", "mlm_accuracy", "entity_f1", "word_accuracy",
                                               "exact_match", "qa_f1") if isinstance(metrics.get(k), float)]
    return (": " + " ".join(shown)) if shown else ""
