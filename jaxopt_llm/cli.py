"""The `jaxopt-llm` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from jaxopt_llm.errors import UserError

DESCRIPTION = ("BERT-style encoders in JAX: pretrain, fine-tune, optimise (adversarial training, distillation, LoRA, "
               "ensembles, cloze prompts, active learning), predict, export and serve. Every training command "
               "writes a run folder that any later command takes as its model. `jaxopt-llm COMMAND --help`: the "
               "command's options, their defaults and an example.")

DEFAULT_SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new movie is so great.",
    "A cheetah is running behind its prey.",
)


class UsageError(UserError):
    """A command-line argument is wrong; main prints it as one `error:` line and exits with code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default when it has one; epilogs keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


class Deprecated(argparse.Action):
    """An option's old spelling, kept for one release: it sets the new option's value and says so."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated here and will be removed in the next release; use "
              f"{self.new}.", file=sys.stderr)
        setattr(namespace, self.dest, values)


# what each training command trains (the recipe's method help says how)
TRAINS = {"finetune": "fine-tune on labelled data: a classifier (default), a token classifier or an extractive "
                      "reader, as the config's task says",
          "pretrain": "masked-LM pretraining on raw text (data.text_column), optionally with next-sentence "
                      "prediction; trains the MLM head a checkpoint lacks",
          "prompt": "PET: fine-tune a masked LM through cloze patterns and a verbalizer (few labels, no new head)"}

EXAMPLES = {
    "predict fill-mask": 'jaxopt-llm predict fill-mask --model bert-base-uncased --top-k 5 "The [MASK] runs."',
    "predict classify": "jaxopt-llm predict classify --model runs/tweets_tiny --file texts.txt\n"
                        'jaxopt-llm predict classify --model artifacts/tweets "great crew"',
    "predict ner": 'jaxopt-llm predict ner --model runs/ner_tiny "Grace Okafor flew to Lisbon"',
    "predict qa": 'jaxopt-llm predict qa --model runs/qa --question "Who flew?" --context "Grace flew to Lisbon."\n'
                  "jaxopt-llm predict qa --model runs/qa --data dev.json",
    "finetune": "jaxopt-llm finetune --config experiments/configs/tweets_tiny.py --workdir runs/x train.steps=100\n"
                "jaxopt-llm finetune --workdir runs/mine data.train_file=mine.csv data.label_column=label",
    "pretrain": "jaxopt-llm pretrain --config experiments/configs/mlm_tiny.py --workdir runs/mlm",
    "prompt": "jaxopt-llm prompt --config experiments/configs/tweets_prompt_tiny.py --workdir runs/tweets_prompt",
    "adversarial": "jaxopt-llm adversarial --config experiments/configs/tweets_adversarial_tiny.py --workdir runs/adv",
    "distill": "jaxopt-llm distill --config experiments/configs/tweets_distill_tiny.py --workdir runs/kd",
    "ensemble": "jaxopt-llm ensemble --config experiments/configs/tweets_ensemble_tiny.py --workdir runs/ens5",
    "lora": "jaxopt-llm lora --config experiments/configs/tweets_tiny.py --workdir runs/lora lora.rank=8",
    "sweep eval": "jaxopt-llm sweep eval --model runs/a --model runs/b --config experiments/configs/tweets_tiny.py "
                  "t=0.5,1,2",
    "sweep robustness": "jaxopt-llm sweep robustness --model runs/a --config experiments/configs/tweets_tiny.py "
                        "--pgd-steps 5 eps=0,0.01,0.02",
    "bench": "jaxopt-llm bench --tasks classify,predict",
    "calibrate": "jaxopt-llm calibrate --model runs/tweets_tiny --config experiments/configs/tweets_tiny.py",
    "stack": "jaxopt-llm stack --out runs/stacked runs/a runs/b runs/c",
    "label init": "jaxopt-llm label init --state runs/al --pool pool.csv --labels negative,neutral,positive",
    "label query": "jaxopt-llm label query --state runs/al --n 50 --out round0.csv",
    "label import": "jaxopt-llm label import --state runs/al round0.csv",
    "label train": "jaxopt-llm label train --state runs/al",
    "label status": "jaxopt-llm label status --state runs/al",
    "label simulate": "jaxopt-llm label simulate --state runs/al --gold-column sentiment --budgets 50,100,200",
    "export": "jaxopt-llm export runs/tweets_tiny --out artifacts/tweets --config experiments/configs/tweets_tiny.py\n"
              "jaxopt-llm export runs/tweets_tiny --out artifacts/tweets_onnx --format onnx",
    "serve": "jaxopt-llm serve artifacts/tweets --port 8000 --log requests.jsonl\n"
             "jaxopt-llm serve artifacts/tweets_onnx --backend onnxruntime",
    "monitor": "jaxopt-llm monitor artifacts/tweets --log requests.jsonl --out monitor/",
    "pipeline run": "jaxopt-llm pipeline run experiments/pipelines/tweets.py --workdir runs/tweets --dry-run",
    "similarity": 'jaxopt-llm similarity "a man is eating" "a man eats bread"',
}


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file:
        file = Path(args.file)
        if not file.is_file():
            raise UsageError(f"--file {args.file!r} does not exist; pass a text file with one text per line.")
        texts += [line.rstrip("\n") for line in file.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip()]
    if not texts:
        raise UsageError("no texts: give them as arguments or with --file FILE (one per line).")
    return texts


def _predict(args: argparse.Namespace) -> None:
    from jaxopt_llm import inference

    _check(args, batch_size=(1, None), max_length=(1, None), top_k=(1, None))
    if args.kind == "qa":
        return _answer(args)
    texts = _texts(args)
    patterns = getattr(args, "pattern", None) or []
    if patterns:  # zero-shot cloze classification with an MLM model: one pattern, or an ensemble of several
        from jaxopt_llm.steps.prompt import Prompt

        if not args.verbalizer:
            raise UsageError("--pattern needs --verbalizer, e.g. 'negative=bad;neutral=okay;positive=great'.")
        prompts = [Prompt.parse(p, args.verbalizer, args.combine) for p in patterns]
        predictor = inference.prompt_ensemble(args.model, prompts, max_length=args.max_length or 128,
                                              batch_size=args.batch_size)
        for text, row in zip(texts, predictor.classify(texts)):
            print(json.dumps({"text": text, **row}, ensure_ascii=False))
        return
    kind = {"fill-mask": "masked-lm", "ner": "tagger"}.get(args.kind, "classifier")  # an ensemble or prompt stays
    model = inference.load(args.model, kind=kind, batch_size=args.batch_size, max_length=args.max_length,
                           allow_untrained_head=args.allow_untrained_head)
    if args.kind == "fill-mask":
        outputs = [{"text": t, "predictions": p} for t, p in zip(texts, model.fill_mask(texts, args.top_k))]
    elif args.kind == "ner":
        outputs = [{"text": t, "entities": e} for t, e in zip(texts, model.tag(texts, args.aggregation))]
    else:
        outputs = [{"text": t, **r} for t, r in zip(texts, model.classify(texts))]
    for row in outputs:
        print(json.dumps(row, ensure_ascii=False))


def _answer(args: argparse.Namespace) -> None:
    """predict qa: one question and context, or every question of a SQuAD file with EM / F1 at the end."""
    from jaxopt_llm import answers, inference

    model = inference.load(args.model, kind="reader", batch_size=args.batch_size, max_length=args.max_length,
                           allow_untrained_head=args.allow_untrained_head)
    options = {k: v for k, v in (("stride", args.stride), ("max_answer_length", args.max_answer_length))
               if v is not None}
    if args.no_answer:
        options["no_answer"] = True
    if args.data:
        from jaxopt_llm.data import squad

        questions = squad.read(args.data)
        scores, found = answers.score(model, questions, **options)
        for q, row in zip(questions, found):
            print(json.dumps({"id": q.id, "question": q.question, **row}, ensure_ascii=False))
        print(json.dumps({"exact_match": round(scores["exact_match"], 2), "f1": round(scores["qa_f1"], 2),
                          "questions": len(questions)}), file=sys.stderr)
        return
    if not (args.question and args.context):
        raise UsageError("predict qa needs --question and --context, or --data FILE (SQuAD format).")
    row = model.answer([args.question], [args.context], **options)[0]
    print(json.dumps({"question": args.question, **row}, ensure_ascii=False))


def _similarity(args: argparse.Namespace) -> None:
    import numpy as np

    from jaxopt_llm import inference
    from jaxopt_llm.assets import minilm_path

    texts = list(args.texts) or list(DEFAULT_SENTENCES)
    model = args.model or minilm_path()
    vectors = inference.load(model, kind="encoder").embed(texts)
    sims = vectors @ vectors.T
    print(f"cosine similarity of mean-pooled embeddings from {model}")
    width = max(len(t) for t in texts)
    for i, t in enumerate(texts):
        print(f"{i}  {t:<{width}}  " + " ".join(f"{s:5.2f}" for s in sims[i]))
    closest = int(np.argsort(sims[0])[-2])
    print(f"closest to sentence 0: sentence {closest} ({sims[0, closest]:.3f})")


def _train(args: argparse.Namespace) -> None:
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import recipes
    from jaxopt_llm.train import train

    method, task = recipes.commands()[args.command]
    implied = [f"method={method.name}"] + ([f"task={task}"] if task else [])
    config = config_lib.load(args.config, implied + list(args.overrides))
    metrics = train(config, args.workdir)
    print(json.dumps({"workdir": str(args.workdir), "eval": metrics}))


def _grid(args: argparse.Namespace, key: str, default) -> list[float]:
    import math

    items = [item.split("=", 1)[1] for item in args.grid if item.split("=", 1)[0] in key.split("|")]
    if not items:
        return list(default)
    try:
        values = [float(x) for x in items[-1].split(",")]
    except ValueError:
        raise UsageError(f"{key.split('|')[0]}={items[-1]!r} is not a comma-separated list of numbers.") from None
    low = 0.0 if key.startswith("eps") else 1e-9
    bad = [v for v in values if not (math.isfinite(v) and v >= low)]
    if bad:
        raise UsageError(f"{key.split('|')[0]}={items[-1]!r}: every value must be a finite number "
                         f"{'>= 0' if low == 0 else '> 0'} (got {bad}).")
    return values


def _sweep(args: argparse.Namespace) -> None:
    from jaxopt_llm import sweep

    _check(args, batch_size=(1, None), chunk=(1, None), steps=(1, None))
    epsilons = _grid(args, "eps|epsilon", ())
    temperatures = _grid(args, "temperature|t", (1.0,))
    if args.kind == "robustness" and not epsilons:
        raise UsageError("give the grid as eps=0,0.01,0.05,0.1")
    groups = [args.model] if args.kind == "eval" else [[m] for m in args.model]  # robustness: any architectures
    rows, start = [], time.perf_counter()
    for models in groups:
        stack = sweep.stack(models, getattr(args, "checkpoints", None))
        if stack.kind != "classifier":
            return _sweep_per_token(args, stack, temperatures, epsilons)
        data = _eval_data(args, stack.tokenizer, stack.labels, stack.max_length)
        chunk = args.chunk or sweep.auto_chunk(stack, args.batch_size, data.eval["input_ids"].shape[1])
        rows += sweep.evaluate(stack, data.eval, temperatures, epsilons, args.steps, args.norm, args.batch_size, chunk)
    seconds = time.perf_counter() - start
    n = len(data.eval["labels"])
    if args.kind == "robustness":
        tables = {name: [{"epsilon": r["epsilon"], "accuracy": r["robust_accuracy"], "n": n} for r in rows
                         if r["model"] == name and "epsilon" in r] for name in args.model}
        print(f"PGD on word embeddings: {args.norm} ball, {args.steps} steps of 2.5 * eps / steps, {n} examples")
        print("epsilon  " + "  ".join(f"{name[-28:]:>28}" for name in tables))
        for i, e in enumerate(epsilons):
            print(f"{e:<9g}" + "  ".join(f"{t[i]['accuracy']:>28.4f}" for t in tables.values()))
        from jaxopt_llm import robustness

        robustness.plot(tables, args.plot, args.norm)
        print(json.dumps({"norm": args.norm, "steps": args.steps, "tables": tables, "plot": args.plot}))
        return
    grid = f"{len(temperatures)} temperature(s)" + (f" x {len(epsilons)} epsilon(s)" if epsilons else "")
    print(f"{len(stack.names)} model(s) x {grid} on {n} examples in {seconds:.1f} s (one compiled program, "
          f"chunks of {chunk})")
    print(f"{'model':<32}{'step':>6}{'T':>6}{'accuracy':>10}{'macro-F1':>10}{'NLL':>8}{'ECE':>8}{'Brier':>8}")
    for r in rows:
        if "temperature" in r:
            print(f"{Path(r['model']).name[-32:]:<32}{str(r['step'] if r['step'] is not None else '-'):>6}"
                  f"{r['temperature']:>6g}{r['accuracy']:>10.4f}{r['f1']:>10.4f}{r['nll']:>8.4f}{r['ece']:>8.4f}"
                  f"{r['brier']:>8.4f}")
    for r in rows:
        if "epsilon" in r:
            print(f"{Path(r['model']).name[-32:]:<32}{str(r['step'] if r['step'] is not None else '-'):>6}"
                  f"  eps={r['epsilon']:g}  robust accuracy {r['robust_accuracy']:.4f}")
    if args.out:
        sweep.write(rows, args.out)
    if args.plot:
        sweep.plot(rows, args.plot, "robust_accuracy" if epsilons and len(temperatures) == 1 and
                   not any(s is not None for s in stack.steps) else "accuracy")
    print(json.dumps({"points": len(rows), "seconds": seconds, "out": args.out, "plot": args.plot}))


def _sweep_per_token(args: argparse.Namespace, stack, temperatures, epsilons) -> None:
    """sweep eval of token classifiers (entity F1) or readers (EM / F1): one row per model or checkpoint."""
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import sweep

    what = "token classifiers" if stack.kind == "tagger" else "readers"
    if args.kind != "eval" or list(temperatures) != [1.0] or epsilons:
        raise UsageError(f"these are {what}: `sweep eval` measures them without a temperature or epsilon grid "
                         "(drop the grid; `sweep robustness` takes classifiers).")
    if (args.config is None) == (args.data is None):
        raise UsageError("pass --config FILE (its eval file) or --data FILE (CoNLL / .jsonl for token classifiers, "
                         "SQuAD JSON for readers).")
    task = "token-classification" if stack.kind == "tagger" else "question-answering"
    config = config_lib.load(args.config, [f"task={task}", *args.overrides] if args.config else [
        f"task={task}", f"data.train_file={args.data}", f"data.eval_file={args.data}", *args.overrides])
    source = config.data.eval_file or config.data.train_file
    start = time.perf_counter()
    if stack.kind == "tagger":
        from jaxopt_llm import tagging
        from jaxopt_llm.data import tagged
        from jaxopt_llm.steps.tokens import TokenClassificationTask, TokenOptions

        options = config.task_options if isinstance(config.task_options, TokenOptions) else TokenOptions()
        if not any(a.startswith("token-classification.scheme=") for a in args.overrides):
            options = dataclasses.replace(options, scheme=tagging.scheme_of(stack.labels))  # the models', unless told
        sentences = tagged.check(tagged.read(source), options.scheme, str(source))
        arrays = tagged.align(stack.tokenizer, sentences, stack.labels, stack.max_length, options.label_all_tokens)
        chunk = args.chunk or sweep.auto_chunk(stack, args.batch_size, stack.max_length)
        rows = sweep.evaluate_tokens(stack, arrays, TokenClassificationTask(options, stack.labels), args.batch_size,
                                     chunk)
        n, columns = f"{len(sentences)} sentences", (("loss", "loss", 4), ("accuracy", "token acc.", 4),
                                                    ("precision", "entity P", 4), ("recall", "entity R", 4),
                                                    ("f1", "entity F1", 4))
    else:
        from jaxopt_llm.data import squad

        questions = squad.read(source)
        chunk = args.chunk or sweep.auto_chunk(stack, args.batch_size, stack.max_length)
        rows = sweep.evaluate_answers(stack, questions, args.batch_size, chunk)
        n, columns = f"{len(questions)} questions", (("exact_match", "EM", 2), ("f1", "F1", 2))
    seconds = time.perf_counter() - start
    print(f"{len(stack.names)} {what} on {n} of {source} in {seconds:.1f} s (one compiled program, chunks of {chunk})")
    print(f"{'model':<32}{'step':>6}" + "".join(f"{label:>11}" for _, label, _ in columns))
    for r in rows:
        print(f"{Path(r['model']).name[-32:]:<32}{str(r['step'] if r['step'] is not None else '-'):>6}"
              + "".join(f"{r[k]:>11.{d}f}" for k, _, d in columns))
    if args.out:
        sweep.write(rows, args.out)
    print(json.dumps({"points": len(rows), "seconds": seconds, "out": args.out, "rows": rows}))


def _eval_data(args: argparse.Namespace, tokenizer, names, max_length: int | None = None):
    """The labelled eval data of --config FILE (its eval split, with overrides) or of --data FILE (all its
    rows), label ids in the order of `names`, texts cut to `max_length` tokens (the model's)."""
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import data as data_lib
    from jaxopt_llm.steps.task import DataNeeds

    if (args.config is None) == (args.data is None):
        raise UsageError("pass --config FILE (its eval split) or --data FILE (csv/json with text and label).")
    if args.config:
        config = config_lib.load(args.config, args.overrides)
    else:
        config = config_lib.load(None, [f"data.train_file={args.data}", f"data.eval_file={args.data}",
                                        *args.overrides])
    if max_length is not None:  # the model's own length: the one truncation rule
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_length=max_length))
    return data_lib.load(config.data, tokenizer, DataNeeds(labels=True), num_labels=config.model.num_labels,
                         names=names)


def _calibrate(args: argparse.Namespace) -> None:
    from jaxopt_llm import inference
    from jaxopt_llm.commands import calibrate_run
    from jaxopt_llm.runs import RunFolder

    run = RunFolder.of(args.model)
    if run is None:
        raise UsageError(f"--model {args.model!r} is not a run folder (run.json): calibration writes "
                         "temperature.json into one.")
    model = inference.load(args.model, temperature=1.0)
    data = _eval_data(args, model.tokenizer, model.labels, model.max_length)
    texts, labels = list(data.texts["eval"]), data.eval["labels"]
    plot = args.plot or str(run.path / "reliability.png")
    record = calibrate_run(args.model, texts, labels, plot)
    print(f"temperature {record['temperature']:.4f} on {record['examples']} examples; "
          + "; ".join(f"{k}: {record['before'][k]:.4f} -> {record['after'][k]:.4f}" for k in ("nll", "ece", "brier")))
    print(json.dumps({**record, "plot": plot}))


def _stack(args: argparse.Namespace) -> None:
    from jaxopt_llm.commands import stack_runs

    out = stack_runs(args.runs, args.out)
    print(json.dumps({"ensemble": str(out), "members": len(args.runs)}))


def _label(args: argparse.Namespace) -> None:
    from jaxopt_llm import active

    _check(args, n=(1, None), steps=(1, None))
    if not getattr(args, "state", None):
        raise UsageError(f"label {args.action}: --state FOLDER is required (the state folder of the labelling "
                         "rounds).")
    if args.action == "init":
        rounds = active.Rounds.init(args.state, args.pool, [x.strip() for x in args.labels.split(",") if x.strip()],
                                    args.config, args.eval_file, args.strategy, args.seed, args.overrides)
        print(json.dumps({"run": str(rounds.path), **rounds.state()}))
        return
    from jaxopt_llm import paths

    rounds = active.Rounds(paths.Path(args.state))
    prompt = None
    if getattr(args, "pattern", None):
        from jaxopt_llm.steps.prompt import Prompt

        prompt = Prompt.parse(args.pattern, args.verbalizer or "")
    if args.action == "query":
        items = rounds.query(args.n, args.strategy, cold_model=args.cold_model, prompt=prompt)
        fmt = args.format or {".csv": "csv", ".jsonl": "jsonl", ".json": "labelstudio"}.get(Path(args.out).suffix)
        if fmt is None:
            raise UsageError(f"--out {args.out!r}: end it in .csv, .jsonl or .json (Label Studio), or pass --format.")
        active.write_items(items, args.out, fmt, rounds.state()["labels"], rounds.round())
        print(json.dumps({"round": rounds.round(), "queried": len(items), "file": args.out}))
    elif args.action == "import":
        print(json.dumps(rounds.import_answers(active.read_answers(args.file))))
    elif args.action == "train":
        print(json.dumps(rounds.train(args.steps)))
    elif args.action == "status":
        print(json.dumps(rounds.status(), indent=1))
    elif args.action == "simulate":
        pool = active.read_pool(rounds.state()["pool"])
        if args.gold_column not in pool[0]:
            raise UsageError(f"--gold-column {args.gold_column!r} is not a column of the pool.")
        try:
            budgets = [int(x) for x in args.budgets.split(",")]
        except ValueError:
            raise UsageError(f"--budgets {args.budgets!r}: give comma-separated counts, e.g. 50,100,200.") from None
        if any(b < 1 for b in budgets) or budgets != sorted(set(budgets)):
            raise UsageError(f"--budgets {args.budgets!r}: counts must be at least 1 and increasing.")
        rows = active.simulate(rounds, active.answers_from_gold(pool, args.gold_column), budgets, args.strategy,
                               steps=args.steps)
        print(json.dumps(rows))


def _export(args: argparse.Namespace) -> None:
    from jaxopt_llm import inference
    from jaxopt_llm.export import export

    _check(args, max_length=(1, None))
    buckets = None
    if args.buckets is not None:
        try:
            buckets = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            raise UsageError(f"--buckets {args.buckets!r}: give comma-separated token counts, e.g. 16,32,64,128.") \
                from None
    texts = []
    if args.config or args.data:
        model = inference.load(args.source, max_length=args.max_length)
        texts = list(_eval_data(args, model.tokenizer, None, model.max_length).texts["eval"])
    golden = _texts(args) if args.file else []
    out = export(args.source, args.out, platforms=tuple(args.platforms.split(",")), buckets=buckets,
                 reference_texts=texts, golden_texts=golden, max_length=args.max_length, format=args.format,
                 quantize=args.quantize)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "hf" not in p.relative_to(out).parts)
    print(json.dumps({"artifact": str(out), "bytes_without_hf": size, "reference_texts": len(texts)}))


def _artifact(reference: str, verify: bool = True, backend: str = "jax"):
    """The exported artifact `reference` names (the loader `inference.load` uses for artifacts, without the
    prediction modules that import jax); anything else is one error."""
    from jaxopt_llm.serving.artifact import Artifact

    return Artifact.load(reference, verify=verify, backend=backend)


def _check(args: argparse.Namespace, **rules: tuple[float, float | None]) -> None:
    """Each named option a finite number within [low, high] (high None: no bound), else one error naming it."""
    import math

    for name, (low, high) in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise UsageError(f"{flag} {value}: must be a finite number {bound}.")


def _serve(args: argparse.Namespace) -> None:
    import socket

    import uvicorn

    from jaxopt_llm.serving.app import Limits, create_app

    _check(args, port=(1, 65535), max_batch=(1, None), max_wait_ms=(0, 60_000), max_texts=(1, None),
           max_chars=(1, None), max_body=(1, None), window=(1, None), body_seconds=(0.001, 3600))
    try:
        socket.getaddrinfo(args.host, args.port)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {args.host!r} is not an address or a name this machine resolves; use e.g. "
                         "127.0.0.1 or 0.0.0.0.") from None
    if args.log and not Path(args.log).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--log {args.log!r}: its folder does not exist.")
    start = time.perf_counter()
    artifact = _artifact(args.artifact, backend=args.backend)
    print(f"loaded {args.artifact} ({artifact.manifest['kind']}, {args.backend}, labels {artifact.labels}) in "
          f"{time.perf_counter() - start:.1f} s; serving on http://{args.host}:{args.port}", file=sys.stderr)
    app = create_app(artifact, Limits(args.max_body, args.max_texts, args.max_chars, args.body_seconds), args.max_batch,
                     args.max_wait_ms / 1000, args.window, args.log)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)


def _monitor(args: argparse.Namespace) -> None:
    from jaxopt_llm.serving.report import monitor_report

    _check(args, window=(1, None))
    artifact = _artifact(args.artifact, verify=False)
    print(json.dumps(monitor_report(artifact, args.log, args.out, args.window)))


def _bench(args: argparse.Namespace) -> None:
    import importlib.util

    from jaxopt_llm import bench

    if importlib.util.find_spec("torch") is None:
        raise UsageError("bench compares against PyTorch: install the CPU wheel with "
                         "`pip install torch==2.13.0` (a plain `torch` brings a CUDA build).")
    c = bench.BenchConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn, batch=args.batch,
                          seq=args.seq, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                          adversarial_steps=args.adversarial_steps, student_layers=args.student_layers,
                          members=args.members, compile_rounds=args.compile_rounds)
    rows = bench.run(c, tuple(args.tasks.split(",")) if args.tasks else bench.TASKS,
                     log=lambda line: print(line, file=sys.stderr, flush=True))  # progress; the table on stdout
    bench.print_table(c, rows, as_json=args.json)


def _pipeline(args: argparse.Namespace) -> None:
    from jaxopt_llm import pipeline

    spec = pipeline.load(args.file)
    workdir = args.workdir or str(Path("runs") / Path(args.file).stem)
    rows = pipeline.run(spec, workdir, from_=args.from_, only=args.only, force=tuple(args.force),
                        dry_run=args.dry_run)
    print(json.dumps({"workdir": workdir, "stages": {r["name"]: {"action": r["action"], "folder": str(r["folder"])}
                                                     for r in rows}}))


def _split_grid(args: argparse.Namespace) -> argparse.Namespace:
    grid_keys = ("eps=", "epsilon=", "temperature=", "t=")
    args.overrides = [g for g in args.grid if not g.startswith(grid_keys)] + list(getattr(args, "overrides", []) or [])
    args.grid = [g for g in args.grid if g.startswith(grid_keys)]
    return args


SERVING = ("serve", "monitor")  # commands that never train: their parser is built without the training ones


def build_parser(serving_only: bool = False) -> argparse.ArgumentParser:
    """The command line. `serving_only`: without the training commands, whose registry imports jax and flax
    (a server on ONNX Runtime starts without either)."""
    parser = argparse.ArgumentParser(prog="jaxopt-llm", description=DESCRIPTION, formatter_class=HelpFormatter,
                                     epilog="--debug (anywhere on the line) or JAXOPT_LLM_DEBUG=1: show the traceback "
                                            "of an expected error too.")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="fill-mask, classify, tag (ner) or answer (qa), printing JSON lines")
    kinds = predict.add_subparsers(dest="kind", required=True)
    for kind, text in (("fill-mask", "the likeliest tokens at each [MASK] of a masked LM"),
                       ("classify", "class probabilities from a classifier, an ensemble, an artifact, or zero-shot "
                                    "from a masked LM with --pattern"),
                       ("ner", "entities with character offsets from a token classifier"),
                       ("qa", "answer spans from an extractive reader, with EM / F1 for a SQuAD file")):
        p = kinds.add_parser(kind, help=text, description=text)
        what = "run folder, HF folder, Hugging Face hub id" + (" or exported artifact" if kind == "classify" else "")
        p.add_argument("--model", required=True, help=what)
        p.add_argument("--file", help="text file, one text per line")
        p.add_argument("--batch-size", type=int, default=32, help="texts per model call")
        p.add_argument("--max-length", type=int,
                       help="tokens per text (default: the run's training length, a model folder's positions; "
                            "128 for --pattern)")
        p.add_argument("--allow-untrained-head", action="store_true",
                       help="predict even when the checkpoint lacks the head's weights (they are random)")
        if kind == "fill-mask":
            p.add_argument("--top-k", type=int, default=5, help="predictions per [MASK]")
        elif kind == "qa":
            p.add_argument("--question", help="one question, answered from --context")
            p.add_argument("--context", help="the passage --question is answered from")
            p.add_argument("--data", help="a SQuAD-format JSON file: every question answered, EM / F1 at the end")
            p.add_argument("--stride", type=int, help="tokens two windows of a long context share (default: the "
                                                      "run's, else 32)")
            p.add_argument("--max-answer-length", type=int, help="tokens (default: the run's, else 30)")
            p.add_argument("--no-answer", action="store_true", help="allow the empty answer (SQuAD 2.0)")
        elif kind == "ner":
            p.add_argument("--aggregation", default="first", choices=("first", "simple", "none"),
                           help="entities from words (first sub-token's tag), from sub-tokens, or every "
                                "tagged sub-token (Hugging Face's aggregation strategies)")
        else:
            p.add_argument("--pattern", action="append",
                           help="zero-shot cloze prompt with one [MASK], e.g. '{text} It was [MASK].'; repeat for "
                                "a pattern ensemble (one program)")
            p.add_argument("--verbalizer", help="label=word|word;label=word, for --pattern")
            p.add_argument("--combine", default="logsumexp", choices=("logsumexp", "mean"),
                           help="how a label's words combine")
        p.add_argument("texts", nargs="*", help="texts to predict (or --file)")
        p.set_defaults(run=_predict)

    from jaxopt_llm import recipes

    for name, (method, task) in ({} if serving_only else recipes.commands()).items():
        what = TRAINS.get(name) or f"{method.help} ({task or 'the config' + chr(39) + 's task'})"
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("--config", help="Python config file defining get_config()")
        p.add_argument("--workdir", required=True, help="run folder; the same folder resumes the run")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
        p.set_defaults(run=_train)

    sweep = sub.add_parser("sweep", help="evaluation sweeps: many models and settings, one compiled program")
    kinds = sweep.add_subparsers(dest="kind", required=True)
    for kind, text in (("eval", "accuracy, macro-F1, NLL, ECE, Brier (and robust accuracy) for stacked runs or "
                                "checkpoints over temperature / epsilon grids"),
                       ("robustness", "accuracy under PGD on the word embeddings for a grid of epsilons")):
        r = kinds.add_parser(kind, help=text)
        r.add_argument("--model", action="append", required=True,
                       help="run folder, HF folder or hub id; repeat to compare models")
        r.add_argument("--config", help="config file whose eval split is used")
        r.add_argument("--data", help="csv / json / jsonl file with text and label (token classifiers: CoNLL or "
                                      ".jsonl of tokens and tags; readers: SQuAD JSON)")
        r.add_argument("--pgd-steps", dest="steps", type=int, default=10 if kind == "robustness" else 5,
                       help="PGD steps of each attack (eps grids)")
        r.add_argument("--steps", dest="steps", type=int, action=Deprecated, new="--pgd-steps")
        r.add_argument("--norm", default="linf", choices=("linf", "l2"), help="the PGD ball: L-infinity or L2")
        r.add_argument("--batch-size", type=int, default=32, help="examples per program call")
        r.add_argument("--chunk", type=int, help="models per program call (default: from the free memory)")
        r.add_argument("--plot", default="robustness.png" if kind == "robustness" else None,
                       help="PNG of the metric against the checkpoint step or the grid value")
        if kind == "eval":
            r.add_argument("--checkpoints", help="all | every:N: every checkpoint of each run, not its export")
            r.add_argument("--out", help="every point as JSON (.json) or CSV (.csv)")
        r.add_argument("grid", nargs="*", help="temperature=1,1.5,2 and/or eps=0,0.01 then key=value config "
                                               "overrides")
        r.set_defaults(run=lambda a: _sweep(_split_grid(a)), overrides=[])

    b = sub.add_parser("bench", help="time our train steps against transformers' PyTorch BERT")
    b.add_argument("--tasks", help="comma-separated rows (default: every row): classify, mlm, adversarial, distill, "
                                   "ensemble, compile, predict, predict-long, cold-start, families, local-attention, "
                                   "unpadded, lora, onnx, onnx-long")
    b.add_argument("--json", action="store_true", help="print the rows as one JSON object only")
    b.add_argument("--members", type=int, default=5, help="members of the ensemble row")
    b.add_argument("--student-layers", type=int, default=2, help="depth of the distillation row's student")
    b.add_argument("--adversarial-steps", type=int, default=1, help="K of the adversarial step")
    b.add_argument("--compile-rounds", type=int, default=3,
                   help="compile rows: the median of this many compiles of each program, interleaved")
    for name, default, text in (("layers", 4, "encoder layers of the bench model"), ("hidden", 256, "its width"),
                                ("heads", 4, "its attention heads"), ("ffn", 1024, "its feed-forward width"),
                                ("batch", 32, "sequences per step"), ("seq", 128, "tokens per sequence"),
                                ("warmup", 2, "untimed steps of each side first")):
        b.add_argument(f"--{name}", type=int, default=default, help=text)
    b.add_argument("--timed-steps", dest="steps", type=int, default=10, help="timed steps of each side (the median)")
    b.add_argument("--steps", dest="steps", type=int, action=Deprecated, new="--timed-steps")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype of both sides")
    b.set_defaults(run=_bench)

    cal = sub.add_parser("calibrate", help="fit a run's temperature on held-out data (temperature.json)")
    cal.add_argument("--model", required=True, help="run folder (single, prompt or ensemble)")
    cal.add_argument("--config", help="config file whose eval split is used")
    cal.add_argument("--data", help="csv / json / jsonl file with text and label")
    cal.add_argument("--plot", help="reliability diagram PNG (default: RUN/reliability.png)")
    cal.add_argument("overrides", nargs="*", help="key=value config overrides")
    cal.set_defaults(run=_calibrate)

    stack = sub.add_parser("stack", help="stack classification runs of one architecture into an ensemble run folder")
    stack.add_argument("--out", required=True, help="the new ensemble run folder")
    stack.add_argument("runs", nargs="+", help="run folders or HF folders")
    stack.set_defaults(run=_stack)

    label = sub.add_parser("label", help="active learning: rounds of queries a person labels in a file")
    actions = label.add_subparsers(dest="action", required=True)
    a = actions.add_parser("init", help="start a state folder over a pool of texts")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a.add_argument("--pool", required=True, help="csv / jsonl with id (optional) and text columns")
    a.add_argument("--labels", required=True, help="label names, comma-separated")
    a.add_argument("--config", help="config file each round trains with (its model, steps, ...)")
    a.add_argument("--eval-file", help="labelled held-out file for the learning curve")
    a.add_argument("--strategy", default="entropy", help="random, least-confidence, entropy, breaking-ties, bald, "
                   "kmeans, coreset, prompt, surprisal")
    a.add_argument("--seed", type=int, default=0, help="seed of the queries' random choices")
    a.add_argument("overrides", nargs="*", help="key=value config overrides for every round")
    a = actions.add_parser("query", help="pick the next texts to label and write them for a person")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a.add_argument("--n", type=int, default=50, help="texts to query")
    a.add_argument("--out", required=True, help="file to label (.csv, .jsonl, or .json for Label Studio)")
    a.add_argument("--out-format", dest="format", choices=("csv", "jsonl", "labelstudio"),
                   help="the file's format (default: from --out's suffix)")
    a.add_argument("--format", dest="format", choices=("csv", "jsonl", "labelstudio"), action=Deprecated,
                   new="--out-format")
    a.add_argument("--strategy", help="override the state's strategy for this round")
    a.add_argument("--cold-model", help="an MLM model for the prompt / surprisal cold start")
    a.add_argument("--pattern", help="prompt cold start: pattern")
    a.add_argument("--verbalizer", help="prompt cold start: label=word;...")
    a = actions.add_parser("import", help="take a labelled file back (skipped items stay in the pool)")
    a.add_argument("file", help="the labelled file (.csv, .jsonl, or a Label Studio .json export)")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a = actions.add_parser("train", help="train the round's model on every label so far")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a.add_argument("--steps", type=int, help="training steps of the round's model (default: the config's "
                                             "train.steps)")
    a = actions.add_parser("status", help="labels per class, learning curve, stopping signal")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a = actions.add_parser("simulate", help="gold labels from the pool answer the queries")
    a.add_argument("--state", dest="state", help="the state folder of the labelling rounds (required)")
    a.add_argument("--run", dest="state", action=Deprecated, new="--state")
    a.add_argument("--gold-column", default="label", help="the pool's column holding the true labels")
    a.add_argument("--budgets", default="50,100,200,400", help="labelled-set sizes after each round")
    a.add_argument("--strategy", help="override the state's strategy")
    a.add_argument("--steps", type=int, help="training steps of each round's model (default: the config's "
                                             "train.steps)")
    label.set_defaults(run=_label)

    e = sub.add_parser("export", help="a portable artifact of a run: jax.export functions, optionally ONNX (with "
                       "its tokenizer, labels, drift reference and golden outputs)")
    e.add_argument("source", metavar="RUN", help="run folder (a classifier, tagger, reader, ensemble or prompt run) "
                   "or a Hugging Face folder")
    e.add_argument("--out", required=True, help="the artifact folder to create (must not exist; missing parent "
                   "folders are made)")
    e.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, tpu")
    e.add_argument("--format", choices=("jax", "onnx"), default="jax", help="onnx: also model.onnx for ONNX "
                   "Runtime, checked equal to the jax.export functions (needs the [onnx] extra and jax2onnx)")
    e.add_argument("--quantize", choices=("int8", "int8-dynamic"), help="int8: dense layers' weights stored as int8 "
                   "with a float32 scale per output column, 4x smaller; int8-dynamic (with --format onnx): "
                   "model.onnx's dense layers on ONNX Runtime's integer kernels, activations quantized per call "
                   "(default: float32, as trained)")
    e.add_argument("--buckets", help="sequence-length buckets, the largest at least the run's length (default: "
                                     "16,32,64,128 below the run's max_length, then it)")
    e.add_argument("--max-length", type=int, help="tokens per text for a bare model folder (default: its positions; "
                                                  "a run: its training length)")
    e.add_argument("--config", help="config file whose eval split is the drift reference")
    e.add_argument("--data", help="csv / json / jsonl whose texts are the drift reference")
    e.add_argument("--golden", dest="file", help="text file of golden texts, one per line, whose outputs every load "
                                                 "checks (default: the first reference texts)")
    e.add_argument("--file", dest="file", action=Deprecated, new="--golden")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the --config / --data reading")
    e.set_defaults(run=_export, texts=[])
    srv = sub.add_parser("serve", help="serve an artifact over HTTP (HF text-classification and KServe v2 routes)")
    srv.add_argument("artifact", help="an exported artifact folder (local or gs://)")
    srv.add_argument("--backend", choices=("jax", "onnxruntime"), default="jax",
                     help="onnxruntime: run the artifact's model.onnx (exported with --format onnx)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8080, help="TCP port")
    srv.add_argument("--max-batch", type=int, default=32, help="texts per model call")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="under load, how long a batch of several "
                     "requests waits for more (a lone request never waits)")
    srv.add_argument("--max-texts", type=int, default=64, help="texts per request")
    srv.add_argument("--max-chars", type=int, default=10_000, help="characters per text")
    srv.add_argument("--max-body", type=int, default=1 << 20, help="bytes per request body")
    srv.add_argument("--body-seconds", type=float, default=10.0,
                     help="a request body must arrive whole within this many seconds (408 otherwise)")
    srv.add_argument("--window", type=int, default=500, help="predictions per drift window")
    srv.add_argument("--log", help="append every prediction to this JSON-lines file (for `monitor`)")
    srv.set_defaults(run=_serve)
    mon = sub.add_parser("monitor", help="drift report of a request log against an artifact's reference")
    mon.add_argument("artifact", help="the artifact the log's predictions came from")
    mon.add_argument("--log", required=True, help="the JSON-lines log written by serve --log")
    mon.add_argument("--out", default="monitor", help="folder for report.md and drift.png")
    mon.add_argument("--window", type=int, default=200, help="predictions per drift window")
    mon.set_defaults(run=_monitor)

    pipe = sub.add_parser("pipeline", help="multi-step pipelines: pretrain -> fine-tune -> optimise -> deploy")
    actions = pipe.add_subparsers(dest="action", required=True)
    r = actions.add_parser("run", help="run the stages of a pipeline file that need it (see --dry-run)")
    r.add_argument("file", help="a pipeline file (experiments/pipelines/)")
    r.add_argument("--workdir", help="the pipeline folder (default: runs/<file name>)")
    r.add_argument("--from", dest="from_", metavar="STAGE", help="rerun this stage and every stage after it")
    r.add_argument("--only", metavar="STAGE", help="run just this stage (its parents must be done)")
    r.add_argument("--force", metavar="STAGE", action="append", default=[],
                   help="rerun this stage and its descendants (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print what would run and why; run nothing")
    r.set_defaults(run=_pipeline)

    sim = sub.add_parser("similarity", help="cosine similarity of sentence embeddings (default: MiniLM)")
    sim.add_argument("--model", help="run folder, HF folder or hub id (default: the packaged all-MiniLM-L6-v2)")
    sim.add_argument("texts", nargs="*", help="sentences to compare (default: five example sentences)")
    sim.set_defaults(run=_similarity, file=None)
    for name, p in subcommands(parser).items():
        p.formatter_class = HelpFormatter
        for action in p._actions:  # a command's --help opens with its line in the parent's list
            if isinstance(action, argparse._SubParsersAction):
                for line in action._choices_actions:
                    action.choices[line.dest].description = action.choices[line.dest].description or line.help
        examples = [text for key, text in EXAMPLES.items() if key == name or key.startswith(name + " ")]
        if examples and not p.epilog:
            p.epilog = "examples:\n  " + "\n  ".join("\n".join(examples).splitlines())
    return parser


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its name ("label query"), the top-level one as ""."""
    out = {prefix.strip(): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.update(subcommands(child, f"{prefix} {name}"))
    return out


def compile_cache() -> str | None:
    """JAX's persistent compilation cache, on by default for the command line: compiled programs are kept in
    $JAXOPT_LLM_CACHE_DIR (default ~/.cache/jaxopt_llm/xla) and reused by later calls. JAXOPT_LLM_COMPILE_CACHE=0
    turns it off."""
    import os

    if os.environ.get("JAXOPT_LLM_COMPILE_CACHE", "1") == "0":
        return None
    import jax

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.environ.get("JAXOPT_LLM_CACHE_DIR") or os.path.join(base, "jaxopt_llm", "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def one_line_warnings() -> None:
    """The package's own warnings print as one `warning: ...` line (not the file, line and source of the call
    that raised them); every other warning keeps Python's format."""
    import os
    import warnings

    default = warnings.formatwarning
    if getattr(default, "one_line", False):
        return

    def format(message, category, filename, lineno, line=None):
        if f"{os.sep}jaxopt_llm{os.sep}" in str(filename):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format.one_line = True
    warnings.formatwarning = format


def main(argv: list[str] | None = None) -> None:
    """Run one command. Expected bad input (`UserError`) is one `error:` line and exit code 2; any other
    exception keeps its traceback. `--debug` (anywhere) or JAXOPT_LLM_DEBUG=1 shows user errors' tracebacks."""
    import os

    from jaxopt_llm import heap

    heap.keep_freed_memory()  # before anything starts JAX's threads
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("JAXOPT_LLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        one_line_warnings()
    parser = build_parser(serving_only=bool(argv) and argv[0] in SERVING)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after options (argparse keeps positionals in one run)
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # bench times compilation: it must compile, not read an earlier run's program; ONNX Runtime compiles nothing
    if args.command != "bench" and getattr(args, "backend", "jax") == "jax":
        compile_cache()
    from jaxopt_llm.errors import PREEMPTED_EXIT_CODE, Preempted

    try:
        args.run(args)
    except Preempted as err:
        print(f"{err} (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # files are written whole (temporary name, then rename): nothing is half-written
        if debug:
            raise
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
