"""The documentation against the code: every option explains itself and shows its default, one meaning per
option name, every `jaxopt-llm ...` command written in the docs parses, the configuration reference covers
every key, and the README's own-CSV example runs (on a tiny model) and predicts what transformers does."""

import argparse
import contextlib
import csv
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import overrides

from jaxopt_llm import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def options(parser):
    """(command name, action) of every visible option and positional of every (sub)command."""
    for name, p in cli.subcommands(parser).items():
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help != argparse.SUPPRESS:
                yield name, action


def test_every_option_has_help_its_default_and_every_command_an_example_that_parses():
    parser = cli.build_parser()
    missing = [f"{name or 'jaxopt-llm'} {'/'.join(a.option_strings) or a.dest}" for name, a in options(parser)
               if not (a.help or "").strip()]
    for name, p in cli.subcommands(parser).items():  # and every subcommand has its line in its parent's help
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
                assert len(action._choices_actions) == len(action.choices), name
    assert missing == []
    for name, p in cli.subcommands(parser).items():
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
        if not name or not leaf:
            continue
        assert p.epilog and f"jaxopt-llm {name}" in p.epilog, name
        assert (p.description or "").strip(), name  # its --help says what it does
        text = p.format_help()
        for a in p._actions:  # every default is shown
            if a.option_strings and a.help != argparse.SUPPRESS and a.default not in (None, False, [],
                                                                                       argparse.SUPPRESS):
                assert f"default: {a.default}" in " ".join(text.split()) or "default" in a.help, (name, a.dest)
        for line in p.epilog.splitlines()[1:]:
            assert parses(line.strip()) is None, line
    helps = {name: cli.subcommands(parser)[""]._subparsers._group_actions[0].choices[name].description
             for name in ("finetune", "pretrain", "prompt")}
    assert len(set(helps.values())) == 3 and "masked-LM" in helps["pretrain"] and "cloze" in helps["prompt"]


def test_one_meaning_per_option_name():
    seen = {}
    for name, a in options(cli.build_parser()):
        for flag in a.option_strings:
            seen.setdefault(flag, []).append((name, a))
    for flag, uses in seen.items():
        assert len({a.dest for _, a in uses}) == 1, (flag, [n for n, _ in uses])
        assert len({a.type for _, a in uses}) == 1, (flag, [n for n, _ in uses])
    # the names that used to mean different things in different commands
    assert all("training steps" in a.help for _, a in seen["--steps"])
    assert {n for n, _ in seen["--format"]} == {"export"} and "--run" not in seen
    assert {n for n, _ in seen["--file"]} == {"predict fill-mask", "predict classify", "predict ner", "predict qa"}
    assert len({a.help for _, a in seen["--window"]}) == 1


def test_old_spellings_still_parse_with_a_warning(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["label", "status", "--run", "s"]).state == "s"
    assert parser.parse_args(["sweep", "eval", "--model", "m", "--steps", "3"]).steps == 3
    assert parser.parse_args(["export", "r", "--out", "o", "--file", "g.txt"]).file == "g.txt"
    err = capsys.readouterr().err
    assert "--run is deprecated here" in err and "use --pgd-steps" in err and "use --golden" in err


def parses(command: str) -> str | None:
    """None if `command` (a `jaxopt-llm ...` line) parses as `cli.main` parses it, else the reason. A bare
    command name (`jaxopt-llm label query`) must name a command; one with an elided part (`...`) must name a
    command and only options it has."""
    words = shlex.split(command)[1:]
    parser = cli.build_parser()
    commands = cli.subcommands(parser)
    path = max((n for n in commands if n and words[:len(n.split())] == n.split()), key=len, default="")
    if "..." in words or words == path.split():
        if not path:
            return f"no command {words[:2]}"
        known = {o for a in commands[path]._actions for o in a.option_strings}
        unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in known]
        return f"{path} has no {unknown}" if unknown else None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(words)
    except SystemExit as exit:
        return None if exit.code == 0 else err.getvalue().strip().splitlines()[-1]  # 0: --help
    if extra and not (hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra)):
        return f"unrecognized arguments: {extra}"
    if "deprecated" in err.getvalue():
        return err.getvalue().strip()
    return None


def doc_commands():
    """(file, command) of every `jaxopt-llm ...` command in the docs: code-block lines (with `\\`
    continuations joined, comments dropped) and inline code."""
    for file in DOCS:
        if not file.is_file():
            continue
        text, fence, block = file.read_text(), None, []
        for line in text.splitlines():
            if line.lstrip().startswith("```"):
                if fence is None:
                    fence, block = line.strip()[3:], []
                    continue
                if fence in ("", "bash", "sh", "console"):
                    for command in "\n".join(block).replace("\\\n", " ").splitlines():
                        command = command.strip().removeprefix("$ ")
                        if command.startswith("jaxopt-llm "):
                            yield file.name, shell_words(command)
                fence = None
            elif fence is not None:
                block.append(line)
            elif re.match(r"    (\$ )?jaxopt-llm ", line):  # an indented code block
                yield file.name, shell_words(line.strip().removeprefix("$ "))
        for inline in re.findall(r"`(jaxopt-llm [^`]+)`", text):
            yield file.name, inline


def shell_words(command: str) -> str:
    """The command without its comment and anything after a redirect or pipe (`> out.jsonl`, `| head`)."""
    return re.split(r"\s+(?:#|>|\||&&|;)", command)[0]


def test_every_jaxopt_llm_command_in_the_docs_parses():
    commands = list(doc_commands())
    assert len(commands) > 40  # the docs were read
    bad = [(f, c, why) for f, c in commands if (why := parses(c))]
    assert bad == []


def test_the_configuration_reference_covers_every_key_with_a_meaning():
    from jaxopt_llm import config_reference

    rows = config_reference.rows()
    keys = {r["key"] for r in rows}
    assert {"model.name_or_path", "data.label_column", "train.learning_rate", "adversarial.epsilon",
            "lora.rank", "distill.teacher"} <= keys
    assert [r["key"] for r in rows if not r["meaning"]] == []
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config_reference.markdown() in page  # python -m jaxopt_llm.config_reference --write docs/configuration.md


def test_the_readme_own_csv_example_fine_tunes_and_predicts_as_transformers(setup, tmp_path, capsys):
    import torch
    import transformers

    readme = (ROOT / "README.md").read_text()
    config_file = ROOT / "experiments" / "configs" / "own_csv.py"
    body = config_file.read_text().split("def get_config() -> Config:\n")[1]
    assert body.strip() in readme  # the README shows the file as it is
    command = next(c for f, c in doc_commands() if f == "README.md" and "own_csv.py" in c)
    rows = list(csv.DictReader((setup / "tweets.csv").open()))
    with (tmp_path / "reviews.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([r["text"], r["sentiment"]] for r in rows)
    tiny = [o for o in overrides(setup, **{"train.steps": 4}) if not o.startswith(("data.train_file",
                                                                                    "data.label_column"))]
    words = shlex.split(command)[1:]
    words = [w.replace("reviews.csv", str(tmp_path / "reviews.csv")).replace("runs/mine", str(tmp_path / "mine"))
             for w in words]
    cli.main(words + tiny)
    capsys.readouterr()
    texts = ["the crew were lovely", "lost my bag again, never flying with you"]
    cli.main(["predict", "classify", "--model", str(tmp_path / "mine"), *texts])
    got = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "mine" / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "mine" / "model")
    with torch.no_grad():
        probs = torch.softmax(reference(**tokenizer(texts, padding=True, truncation=True, max_length=32,
                                                    return_tensors="pt")).logits, -1).numpy()
    labels = [reference.config.id2label[i] for i in range(probs.shape[1])]
    assert labels == ["negative", "neutral", "positive"]
    for row, p in zip(got, probs):
        scores = {r["label"]: r["score"] for r in row["scores"]} if isinstance(row["scores"][0], dict) else \
            dict(zip(labels, row["scores"]))
        np.testing.assert_allclose([scores[label] for label in labels], p, atol=1e-5)


@pytest.mark.parametrize("page", ["README.md"])
def test_the_readme_is_a_short_user_guide(page):
    text = (ROOT / page).read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b[0-9a-f]{7,40}\b", text)  # no commit hashes
    for heading in ("Install", "Quickstart", "your own CSV", "Python API", "Serve", "TPU", "Methods"):
        assert heading.lower() in text.lower(), heading
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text) if not link.startswith("http")]
    assert len(links) > 10 and [link for link in links if not (ROOT / link).exists()] == []


def test_the_readme_python_api_names_exist():
    import functools

    import jaxopt_llm
    from jaxopt_llm.inference import Inference

    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"`jl\.([\w.]+)\(", text))
    assert {"from_pretrained", "load_model", "train.train"} <= names
    for name in names:
        assert callable(functools.reduce(getattr, name.split("."), jaxopt_llm)), name
    row = next(line for line in text.splitlines() if line.startswith("| `jl.load_model("))
    for method in re.findall(r"`\.(\w+)\(", row):
        assert callable(getattr(Inference, method)), method


def documented_objects():
    """(module, name, object) of everything docs/api.md asks mkdocstrings to render: a `::: module` block's
    `members` list, or the public functions and classes the module defines."""
    import importlib
    import inspect

    text = (ROOT / "docs" / "api.md").read_text()
    for module, members in re.findall(r"^::: ([\w.]+)(?:\n    options:\n      members: \[([^\]]*)\])?", text, re.M):
        m = importlib.import_module(module)
        names = [n.strip() for n in members.split(",")] if members else [
            n for n, v in vars(m).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and v.__module__ == module]
        for name in names:
            yield module, name, getattr(m, name)


def test_the_api_reference_covers_the_top_level_names_and_each_has_a_docstring():
    import jaxopt_llm

    documented = list(documented_objects())
    assert len(documented) > 40
    assert [f"{m}.{n}" for m, n, obj in documented if not (obj.__doc__ or "").strip()] == []
    ids = {id(obj) for _, _, obj in documented}
    assert [n for n in jaxopt_llm.__all__ if id(getattr(jaxopt_llm, n)) not in ids] == []
    # a top-level name is the same object on every access (a name that is also a submodule would not be)
    assert all(getattr(jaxopt_llm, n) is getattr(jaxopt_llm, n) for n in jaxopt_llm.__all__)
    assert callable(jaxopt_llm.train.train) and jaxopt_llm.train is jaxopt_llm.train


def test_the_docs_build_fails_on_a_broken_link_as_ci_runs_it(tmp_path):
    """`make docs` (what .ci/run calls) must fail on any warning: a planted link to a missing heading."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    recipe = (ROOT / "Makefile").read_text().split("\ndocs:")[1].split("\n\n")[0]
    command = next(line.strip() for line in recipe.splitlines() if "mkdocs build" in line)
    assert "--strict" in command and "--quiet" not in command  # --quiet hides the warnings strict counts
    for name in ("docs", "jaxopt_llm"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "lora.md"
    page.write_text(page.read_text() + "\nSee [a heading that is not there](results.md#no-such-heading).\n")
    mkdocs = [sys.executable, "-m", "mkdocs", *command.split("mkdocs", 1)[1].split()]
    run = subprocess.run(mkdocs, cwd=tmp_path, capture_output=True, text=True, env={**os.environ,
                                                                                      "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode != 0 and "no-such-heading" in run.stderr, run.stderr[-2000:]


def test_every_config_key_the_docs_name_exists():
    from jaxopt_llm import config_reference

    keys = {r["key"] for r in config_reference.rows()}
    sections = sorted({k.split(".")[0] for k in keys if "." in k}, key=len, reverse=True)
    pattern = re.compile(r"`((?:%s)\.[a-z_0-9]+)(?:=[^`]*)?`" % "|".join(map(re.escape, sections)))
    named = [(f.name, key) for f in DOCS if f.is_file() and f.name not in ("results.md", "speed_log.md", "ci_log.md")
             for key in pattern.findall(f.read_text())
             if not key.endswith((".py", ".json", ".jsonl", ".onnx", ".safetensors", ".csv", ".md"))]
    assert len(named) > 50
    assert [(f, key) for f, key in named if key not in keys] == []
