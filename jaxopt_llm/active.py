"""Human in the loop: active-learning rounds with label files a person edits (webis-de/small-text's
strategies, a file round trip instead of a labelling tool's API).

A state folder holds everything a round needs, and nothing is ever lost or done twice:

    DIR/state.json          pool file, label names, base config, eval file, strategy, seed
    DIR/labelled.jsonl      every label a person (or the gold file) gave: {"id", "text", "label", "round"}
    DIR/queries/<k>.json    the ids queried in round k, written before the export file
    DIR/rounds/<k>/         the model trained on the labels of rounds 0 .. k (a run folder)
    DIR/rounds/<k>/pool.npy its class probabilities on the whole pool (the stopping signal compares rounds)

Rounds are idempotent: querying again before an import re-emits the same items; training a finished
round does nothing; an import is checked whole (unknown ids or labels: one error listing them) before
labelled.jsonl is atomically rewritten.

Strategies score the unlabelled pool in jitted, length-bucketed batches: random, least-confidence,
entropy, breaking-ties (smallest margin), bald (mutual information, from an ensemble run or MC dropout),
kmeans / coreset (diversity on [CLS] embeddings), and cold starts that need no labels: prompt (entropy of
zero-shot prompt scores) and surprisal (the MLM loss of the text, ALPS-style).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm import paths
from jaxopt_llm.errors import UserError
from jaxopt_llm.runs import write_json

STRATEGIES = ("random", "least-confidence", "entropy", "breaking-ties", "bald", "kmeans", "coreset", "prompt",
              "surprisal")
FORMATS = ("csv", "jsonl", "labelstudio")


class LabelError(UserError):
    """A label file or round cannot be used; the message lists what is wrong and the fix."""


# ---- strategies: pure functions of model outputs -> the indices to query, most useful first -------------


def entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return -np.sum(probs * np.log(p), -1)


def scores(strategy: str, probs: np.ndarray | None = None, member_probs: np.ndarray | None = None) -> np.ndarray:
    """Higher = query first. probs (n, c); member_probs (members or dropout samples, n, c) for bald."""
    if strategy == "least-confidence":
        return 1.0 - probs.max(-1)
    if strategy in ("entropy", "prompt"):
        return entropy(probs)
    if strategy == "breaking-ties":
        top2 = np.sort(probs, -1)[:, -2:]
        return -(top2[:, 1] - top2[:, 0])  # the smallest margin between the two likeliest labels
    if strategy == "bald":
        return entropy(member_probs.mean(0)) - entropy(member_probs).mean(0)
    raise UserError(f"strategy {strategy!r} does not score examples one by one.")


def coreset(embeddings: np.ndarray, n: int, labelled: np.ndarray | None = None) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018): repeatedly the point farthest from everything chosen and
    from the labelled points (with none labelled, it starts from the first point)."""
    x = embeddings.astype(np.float64)
    chosen: list[int] = []
    if labelled is not None and len(labelled):
        dist = np.min(((x[:, None, :] - np.asarray(labelled, np.float64)[None, :, :]) ** 2).sum(-1), 1)
    else:
        dist = np.full(len(x), np.inf)
    while len(chosen) < n:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(-1))
        dist[chosen] = -1.0
    return chosen


def kmeans(embeddings: np.ndarray, n: int, seed: int, iterations: int = 20) -> list[int]:
    """k-means with n centres (k-means++ start); the point nearest each centre."""
    rng = np.random.default_rng(seed)
    x = embeddings.astype(np.float64)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    for _ in range(iterations):
        assign = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), 1)
        for c in range(n):
            if np.any(assign == c):
                centres[c] = x[assign == c].mean(0)
    chosen = []
    for c in range(n):
        d = ((x - centres[c]) ** 2).sum(-1)
        d[chosen] = np.inf
        chosen.append(int(np.argmin(d)))
    return chosen


def pick(strategy: str, n: int, seed: int, *, probs=None, member_probs=None, embeddings=None,
         labelled_embeddings=None) -> list[int]:
    """The n pool indices to query, most useful first."""
    count = len(next(x for x in (probs, member_probs, embeddings) if x is not None)) if strategy != "random" else None
    if strategy == "random":
        return [int(i) for i in np.random.default_rng([seed, 5]).permutation(len(probs))[:n]]
    if strategy == "coreset":
        return coreset(embeddings, min(n, count), labelled_embeddings)
    if strategy == "kmeans":
        return kmeans(embeddings, min(n, count), seed)
    s = scores(strategy, probs, member_probs)
    return [int(i) for i in np.argsort(-s, kind="stable")[:n]]


# ---- model outputs on the pool, jitted and length-bucketed ------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "samples"))
def _mc_dropout(graphdef, state, ids, mask, types, key, samples):
    """(samples, b, c) probabilities with dropout on: one forward per key, vmapped."""
    model = nnx.merge(graphdef, state)

    def one(k):
        return jax.nn.softmax(model(ids, attention_mask=mask, token_type_ids=types, deterministic=False,
                                    dropout_key=k), -1)

    return jax.vmap(one)(jax.random.split(key, samples))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _cls(graphdef, state, ids, mask, types):
    model = nnx.merge(graphdef, state)
    return model.encode(model.embed(ids), mask, types)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _surprisal(graphdef, state, ids, mask, types, key, mask_id):
    """Per text the mean MLM loss at 15 % of its tokens masked (ALPS' surprisal, as one number); `mask_id`
    is the tokenizer's mask token."""
    model = nnx.merge(graphdef, state)
    real = (mask > 0) & (jnp.arange(ids.shape[1])[None] > 0)
    chosen = (jax.random.uniform(key, ids.shape) < 0.15) & real
    masked = jnp.where(chosen, mask_id, ids)
    logits = model.mlm_logits(model.encode(model.embed(masked), mask, types))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(chosen, nll, 0), -1) / jnp.maximum(chosen.sum(-1), 1)


def pool_outputs(strategy: str, model_ref: str | None, texts: Sequence[str], *, seed: int = 0, prompt=None,
                 dropout_samples: int = 5, batch_size: int = 64) -> dict[str, np.ndarray]:
    """What `strategy` needs from a model on the pool: probs, member_probs (bald) or embeddings."""
    from jaxopt_llm import inference

    if strategy == "random":
        return {"probs": np.zeros((len(texts), 1))}
    texts = list(texts)
    if strategy == "prompt":
        return {"probs": inference.load(model_ref, prompt=prompt, batch_size=batch_size).probs(texts)}
    if strategy == "surprisal":
        engine = inference.load(model_ref, kind="masked-lm", batch_size=batch_size).engine
        key, mask_id = jax.random.key(seed), engine.tokenizer.mask_token_id
        surprisal = engine.map(texts, lambda a: _surprisal(engine.graphdef, engine.state, a["input_ids"],
                                                           a["attention_mask"], a["token_type_ids"], key, mask_id))
        return {"probs": np.zeros((len(texts), 1)), "surprisal": surprisal}
    model = inference.load(model_ref, batch_size=batch_size)
    engine = model.engine
    out = {}
    if model.kind == "ensemble":
        members = model.member_probs(texts)
        out["member_probs"], out["probs"] = members, members.mean(0)
    else:
        out["probs"] = model.probs(texts)
        if strategy == "bald":  # one model: MC dropout
            key = jax.random.key(seed)
            samples = engine.map(texts, lambda a: np.swapaxes(np.asarray(_mc_dropout(
                engine.graphdef, engine.state, a["input_ids"], a["attention_mask"], a["token_type_ids"], key,
                dropout_samples)), 0, 1))
            out["member_probs"] = np.swapaxes(samples, 0, 1)
    if strategy in ("kmeans", "coreset"):
        state = engine.state if model.kind != "ensemble" else jax.tree.map(lambda x: x[0], engine.state)
        out["embeddings"] = engine.map(texts, lambda a: _cls(engine.graphdef, state, a["input_ids"],
                                                             a["attention_mask"], a["token_type_ids"]))
    return out


# ---- files a person edits ----------------------------------------------------------------------------------


def read_pool(file: str | Path, text_column: str = "text", id_column: str = "id") -> list[dict]:
    """Rows {"id", "text", ...} of a CSV / JSON-lines pool; ids default to the row number."""
    from jaxopt_llm.data.sources import _read_file

    path = paths.Path(file)
    if not path.is_file():
        raise LabelError(f"pool file {str(file)!r} does not exist.")
    rows = _read_file(path, "utf-8")
    if rows and text_column not in rows[0]:
        raise LabelError(f"{str(file)!r} has no column {text_column!r}; its columns are {sorted(rows[0])}.")
    out, seen = [], set()
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if text is None or not str(text).strip():
            continue
        rid = str(row.get(id_column, i))
        if rid in seen:
            raise LabelError(f"{str(file)!r} has the id {rid!r} twice; ids must be unique.")
        seen.add(rid)
        out.append({**row, "id": rid, "text": str(text)})
    if not out:
        raise LabelError(f"{str(file)!r} has no texts.")
    return out


def write_items(items: list[dict], out: str | Path, fmt: str, labels: Sequence[str], round_: int) -> None:
    """Items to label (id, text, prediction, score) as CSV, JSON lines or Label Studio tasks (with the
    model's prediction as pre-annotation); written to a temporary name, then renamed."""
    if fmt not in FORMATS:
        raise LabelError(f"--format {fmt!r}: use one of {FORMATS}.")
    path = paths.Path(out)
    if fmt == "labelstudio":
        tasks = []
        for i, item in enumerate(items):
            task = {"id": i + 1, "data": {"text": item["text"], "pool_id": item["id"]}}
            if item.get("prediction") is not None:
                task["predictions"] = [{"model_version": f"round-{round_}", "score": item["score"], "result": [
                    {"from_name": "label", "to_name": "text", "type": "choices",
                     "value": {"choices": [item["prediction"]]}}]}]
            tasks.append(task)
        text = json.dumps(tasks, indent=1, ensure_ascii=False)
    elif fmt == "jsonl":
        text = "".join(json.dumps({"id": it["id"], "text": it["text"], "prediction": it.get("prediction"),
                                   "score": it.get("score"), "label": ""}, ensure_ascii=False) + "\n" for it in items)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["id", "text", "prediction", "score", "label"])
        writer.writeheader()
        for it in items:
            writer.writerow({"id": it["id"], "text": it["text"], "prediction": it.get("prediction") or "",
                             "score": "" if it.get("score") is None else f"{it['score']:.4f}", "label": ""})
        text = buffer.getvalue()
    paths.write_text(path, text)


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LabelError(f"{where} not valid JSON ({err}).") from None


class Answers(dict):
    """{pool id: label, or None when skipped}, with `lines`: {pool id: where it was in the file} for errors."""

    def __init__(self, items=(), lines=None):
        super().__init__(items)
        self.lines: dict[str, str] = dict(lines or {})


def read_answers(file: str | Path) -> Answers:
    """{pool id: label, or None when the item was skipped} from a labelled CSV, JSON-lines or Label Studio
    export. Label Studio: the last annotation that was not cancelled; none -> skipped. A file with no answers,
    an id answered twice, or a record of the wrong shape is one error naming the file and the line (task)."""
    path = paths.Path(file)
    if not path.is_file():
        raise LabelError(f"label file {str(file)!r} does not exist.")
    text = path.read_text(encoding="utf-8-sig")
    pairs: list[tuple[str, str | None, str]] = []  # (id, label, where)
    if text.lstrip().startswith("["):
        tasks = _json(text, f"{str(file)!r} is")
        if not isinstance(tasks, list):
            raise LabelError(f"{str(file)!r}: a Label Studio export is a list of tasks.")
        for n, task in enumerate(tasks, 1):
            where = f"task {n}"
            try:
                data = task.get("data", {})
                rid = str(data.get("pool_id", task.get("id")))
                labels = []
                for a in task.get("annotations", []):
                    if a.get("was_cancelled"):
                        continue
                    for r in a.get("result", []):
                        choices = r.get("value", {}).get("choices")
                        if choices:
                            if not isinstance(choices, list) or not isinstance(choices[0], str):
                                raise TypeError("choices must be a list of label names")
                            labels.append(choices[0])
            except (AttributeError, TypeError) as err:
                raise LabelError(f"{str(file)!r} {where}: not a Label Studio task of this tool's shape ({err}).") \
                    from None
            if rid == "None":
                raise LabelError(f"{str(file)!r} {where}: no data.pool_id or id.")
            pairs.append((rid, labels[-1] if labels else None, where))
    else:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = _json(line, f"{str(file)!r} line {n}:")
                if not isinstance(row, dict):
                    raise LabelError(f"{str(file)!r} line {n}: a record must be an object with id and label.")
                rows.append((f"line {n}", row))
        else:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = [(f"line {reader.line_num}", row) for row in reader]
            if reader.fieldnames and ("id" not in reader.fieldnames or "label" not in reader.fieldnames):
                raise LabelError(f"{str(file)!r} needs the columns id and label; it has {sorted(reader.fieldnames)}.")
        for where, row in rows:
            if "id" not in row or "label" not in row:
                raise LabelError(f"{str(file)!r} {where} needs id and label; it has {sorted(row)}.")
            label = row["label"]
            if label is not None and not isinstance(label, (str, int, float)):
                raise LabelError(f"{str(file)!r} {where}: label {label!r} is not a label name.")
            pairs.append((str(row["id"]), (str(label).strip() or None) if label is not None else None, where))
    if not pairs:
        raise LabelError(f"{str(file)!r} holds no answers (an empty file, or a header alone): nothing to import.")
    seen: dict[str, str] = {}
    twice = []
    for rid, _, where in pairs:
        if rid in seen:
            twice.append(f"{rid!r} ({seen[rid]} and {where})")
        seen.setdefault(rid, where)
    if twice:
        raise LabelError(f"{str(file)!r} answers the same id more than once: {', '.join(twice[:10])}. Keep one "
                         "answer per id and import it again.")
    return Answers(((rid, label) for rid, label, _ in pairs), {rid: where for rid, _, where in pairs})


# ---- the state folder ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rounds:
    """An active-learning state folder (see the module docstring)."""

    path: Path

    @classmethod
    def init(cls, path: str | Path, pool: str, labels: Sequence[str], config: str | None, eval_file: str | None,
             strategy: str = "entropy", seed: int = 0, overrides: Sequence[str] = ()) -> Rounds:
        if strategy not in STRATEGIES:
            raise LabelError(f"--strategy {strategy!r}: use one of {STRATEGIES}.")
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise LabelError(f"--labels {list(labels)}: give at least two distinct label names.")
        rounds = cls(paths.Path(path))
        if rounds.state_file.is_file():
            state = rounds.state()
            if state["pool"] != str(pool) or state["labels"] != list(labels):
                raise LabelError(f"{path} already holds rounds over {state['pool']} with labels {state['labels']}; "
                                 "use another --state folder.")
            return rounds
        read_pool(pool)
        write_json(rounds.state_file, {"pool": str(pool), "labels": list(labels), "config": config,
                                       "eval_file": eval_file, "strategy": strategy, "seed": seed,
                                       "overrides": list(overrides)})
        return rounds

    state_file = property(lambda self: self.path / "state.json")
    labelled_file = property(lambda self: self.path / "labelled.jsonl")

    def state(self) -> dict:
        if not self.state_file.is_file():
            raise LabelError(f"{self.path} holds no rounds: start with "
                             f"`jaxopt-llm label init --state {self.path} ...`.")
        return json.loads(self.state_file.read_text())

    def labelled(self) -> list[dict]:
        if not self.labelled_file.is_file():
            return []
        return [json.loads(line) for line in self.labelled_file.read_text().splitlines() if line.strip()]

    def queries(self, k: int) -> list[str] | None:
        file = self.path / "queries" / f"{k}.json"
        return json.loads(file.read_text())["ids"] if file.is_file() else None

    def round(self) -> int:
        """The current round: the first whose queries have not been imported."""
        k = 0
        while self.queries(k) is not None and self._imported(k):
            k += 1
        return k

    def _imported(self, k: int) -> bool:
        return (self.path / "queries" / f"{k}.done").is_file()

    def model(self, k: int) -> Path:
        return self.path / "rounds" / str(k)

    def trained(self, k: int) -> bool:
        return (self.model(k) / "round.json").is_file()

    def latest_model(self) -> Path | None:
        trained = [k for k in range(self.round() + 1) if (self.model(k) / "run.json").is_file()
                   and ((self.model(k) / "model").is_dir() or (self.model(k) / "members").is_dir())]
        return self.model(trained[-1]) if trained else None

    # -- query ------------------------------------------------------------------------------------------
    def query(self, n: int, strategy: str | None = None, *, cold_model: str | None = None, prompt=None) -> list[dict]:
        """Round k's items: the same ones again if round k was queried but not imported yet."""
        state, k = self.state(), self.round()
        pool = read_pool(state["pool"])
        by_id = {row["id"]: row for row in pool}
        done = self.queries(k)
        if done is not None:
            return [dict(by_id[i]) for i in done]
        labelled = {r["id"] for r in self.labelled()}
        candidates = [row for row in pool if row["id"] not in labelled]
        if not candidates:
            raise LabelError(f"every text of {state['pool']} is labelled: the pool is exhausted.")
        strategy = strategy or state["strategy"]
        model = self.latest_model()
        if model is None and strategy not in ("random", "prompt", "surprisal", "kmeans", "coreset"):
            strategy = "random"  # a cold start: no model yet
        ref = str(model) if model is not None and strategy not in ("prompt", "surprisal") else cold_model
        if strategy != "random" and ref is None:
            raise LabelError(f"strategy {strategy} needs a model: train a round first, or pass --cold-model.")
        texts = [row["text"] for row in candidates]
        outputs = pool_outputs(strategy, ref, texts, seed=state["seed"] + k, prompt=prompt)
        if strategy == "surprisal":
            order = [int(i) for i in np.argsort(-outputs["surprisal"], kind="stable")[:n]]
        else:
            order = pick(strategy, n, state["seed"] + k, probs=outputs.get("probs"),
                         member_probs=outputs.get("member_probs"), embeddings=outputs.get("embeddings"))
        items = []
        for i in order:
            item = dict(candidates[i])
            if model is not None and outputs["probs"].shape[-1] == len(state["labels"]):
                item["prediction"] = state["labels"][int(outputs["probs"][i].argmax())]
                item["score"] = float(outputs["probs"][i].max())
            items.append(item)
        write_json(self.path / "queries" / f"{k}.json", {"ids": [it["id"] for it in items], "strategy": strategy,
                                                        "time": time.time()})
        return items

    # -- import -----------------------------------------------------------------------------------------
    def import_answers(self, answers: dict[str, str | None]) -> dict:
        """Merge a person's answers: checked whole first (every id known, every label one of the run's);
        skipped items stay in the pool; a new label for a labelled id replaces it. Importing the same answers
        again changes nothing; an import that adds or changes no label leaves the round open."""
        state, k = self.state(), self.round()
        pool = {row["id"]: row for row in read_pool(state["pool"])}
        lines = getattr(answers, "lines", {})

        def at(rid):
            return f"{rid!r} ({lines[rid]})" if rid in lines else repr(rid)

        unknown_ids = [at(i) for i in answers if i not in pool]
        unknown_labels = [f"{v!r} for {at(i)}" for i, v in answers.items() if v is not None and v not in state["labels"]]
        if unknown_ids or unknown_labels:
            problems = []
            if unknown_ids:
                problems.append(f"ids not in the pool: {', '.join(unknown_ids[:20])}")
            if unknown_labels:
                problems.append(f"labels not among {state['labels']}: {', '.join(unknown_labels[:20])}")
            raise LabelError("nothing imported: " + "; ".join(problems) + ". Fix the file and import it again.")
        records = {r["id"]: r for r in self.labelled()}
        before = dict(records)
        added = replaced = skipped = 0
        for rid, label in answers.items():
            if label is None:
                skipped += 1
                continue
            if rid in records and records[rid]["label"] != label:
                replaced += 1
            elif rid not in records:
                added += 1
            records[rid] = {**records.get(rid, {}), "id": rid, "text": pool[rid]["text"], "label": label,
                            "round": records[rid]["round"] if rid in records and records[rid]["label"] == label else k}
        queried = set(self.queries(k) or ())
        if not added and not replaced and not (queried & {i for i, v in answers.items() if v is not None}):
            if self._imported(k) or not queried:  # the same answers again: nothing changes
                return {"round": k, "added": 0, "replaced": 0, "skipped": skipped, "labelled": len(records),
                        "unchanged": True}
            raise LabelError(f"the answers add no label ({skipped} skipped, {len(answers) - skipped} already "
                             f"labelled alike): round {k} stays open. Label the queried items and import again.")
        if records != before:
            paths.write_text(self.labelled_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                         for r in records.values()))
        if self.queries(k) is not None:
            write_json(self.path / "queries" / f"{k}.done", {"added": added, "replaced": replaced, "skipped": skipped})
        return {"round": k, "added": added, "replaced": replaced, "skipped": skipped, "labelled": len(records)}

    # -- train ------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> dict:
        """Fine-tune a model on every label so far (round k = the last imported round); a finished round is
        not trained again."""
        from jaxopt_llm import config as config_lib
        from jaxopt_llm.train import train

        state, k = self.state(), self.round() - 1
        if k < 0 or not self.labelled():
            raise LabelError("no labels yet: query, label and import a round first.")
        if self.trained(k):  # trained already: nothing is trained twice
            info = json.loads((self.model(k) / "round.json").read_text())
            return {"round": k, "labelled": info["labelled"], **info["eval"]}
        overrides = [*state["overrides"], f"data.train_file={self.labelled_file}", "data.text_column=text",
                     "data.label_column=label", "train.progress=false", *([f"train.steps={steps}"] if steps else [])]
        if state["eval_file"]:
            overrides.append(f"data.eval_file={state['eval_file']}")
        overrides.append("data.labels=" + ",".join(state["labels"]))  # one label order in every round
        config = config_lib.load(state["config"], overrides)
        start = time.perf_counter()
        metrics = train(config, self.model(k))
        seconds = time.perf_counter() - start
        predictor_texts = [row["text"] for row in read_pool(state["pool"])]
        probs = pool_outputs("entropy", str(self.model(k)), predictor_texts)["probs"]
        buffer = io.BytesIO()
        np.save(buffer, probs)
        (self.model(k) / "pool.npy").write_bytes(buffer.getvalue())
        write_json(self.model(k) / "round.json", {"round": k, "labelled": len(self.labelled()), "eval": metrics,
                                                  "train_seconds": seconds})
        return {"round": k, "labelled": len(self.labelled()), **metrics}

    # -- status -----------------------------------------------------------------------------------------
    def status(self) -> dict:
        state = self.state()
        labelled = self.labelled()
        counts = {name: sum(r["label"] == name for r in labelled) for name in state["labels"]}
        curve, agreement, previous = [], [], None
        k = 0
        while self.trained(k):
            info = json.loads((self.model(k) / "round.json").read_text())
            curve.append({"round": k, "labelled": info["labelled"], **{m: info["eval"].get(m) for m in
                                                                      ("accuracy", "f1")}})
            pool = np.load(io.BytesIO((self.model(k) / "pool.npy").read_bytes()))
            if previous is not None:
                agreement.append(float(np.mean(pool.argmax(-1) == previous.argmax(-1))))
            previous, k = pool, k + 1
        stop = bool(len(agreement) >= 2 and min(agreement[-2:]) >= 0.99)
        return {"round": self.round(), "labelled": len(labelled), "per_class": counts, "curve": curve,
                "agreement": agreement, "stop": stop}


def simulate(rounds: Rounds, gold: dict[str, str], budgets: Sequence[int], strategy: str, *,
             steps: int | None = None) -> list[dict]:
    """Gold labels answer the queries: query up to each budget, import, train; one row per round with the
    eval metrics and the wall time of the round. Rerun after a crash, a budget whose labels are in is trained
    if its round was not, and a budget passed earlier reports its trained round; seconds is None for a round
    not trained by this call."""
    out = []
    for budget in budgets:
        start = time.perf_counter()
        n = budget - len(rounds.labelled())
        if n < 0:
            done = [c for c in rounds.status()["curve"] if c["labelled"] == budget]
            out += [{"labelled": budget, "accuracy": c["accuracy"], "f1": c["f1"], "seconds": None} for c in done[:1]]
            continue
        if n > 0:
            items = rounds.query(n, strategy)
            rounds.import_answers({it["id"]: gold[it["id"]] for it in items})
        trained_before = rounds.trained(rounds.round() - 1)
        metrics = rounds.train(steps)
        out.append({"labelled": metrics["labelled"], "accuracy": metrics.get("accuracy"), "f1": metrics.get("f1"),
                    "seconds": None if trained_before else time.perf_counter() - start})
    return out


def answers_from_gold(pool: list[dict], column: str) -> dict[str, str]:
    return {row["id"]: str(row[column]) for row in pool}

