"""The package's shape: no import cycles (top-level or inside functions), light modules stay light, and one
place decides what a run folder holds and how texts become token arrays for inference."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxopt_llm"


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxopt_llm modules it imports anywhere in its text (top level and inside functions)."""
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {d for d in deps if d in modules and d not in (name, "jaxopt_llm")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert {"jaxopt_llm.inference", "jaxopt_llm.pipeline.runner", "jaxopt_llm.metrics"} <= set(graph)
    assert "jaxopt_llm.predict" in graph["jaxopt_llm.inference"]  # imports inside functions are seen
    assert cycles(graph) == []


def test_leaves_import_no_other_module_of_the_package():
    graph = import_graph()
    for leaf in ("jaxopt_llm.metrics", "jaxopt_llm.errors", "jaxopt_llm.packing"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert graph["jaxopt_llm.calibration"] == {"jaxopt_llm.metrics"}  # formulas only


def test_light_modules_load_without_flax():
    code = ("import sys, jaxopt_llm.pipeline, jaxopt_llm.metrics, jaxopt_llm.packing, jaxopt_llm.runs; "
            "print(sorted(m for m in ('flax', 'optax', 'transformers', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_one_place_decides_what_a_run_holds_and_how_texts_become_arrays():
    """Reading a run's members or prompt.json to decide its kind happens in runs.py (RunFolder.kind) and
    inference.py only; tokenizer calls that make inference arrays happen in packing.py only (training data is
    data/ and the prompt task's own encoding)."""
    kind_reads = re.compile(r"\.members\(\)|read\(\"prompt\.json\"\)|\(\"prompt\.json\"\)\.is_file|task\(\) ==")
    tokenizer_calls = re.compile(r"\.encode_batch\(|enable_truncation\(|truncation=True")
    allowed_kind = {"jaxopt_llm/runs.py", "jaxopt_llm/inference.py", "jaxopt_llm/train.py",
                    "jaxopt_llm/steps/distill.py"}  # train: whether a run finished; distill: teachers, via kind()
    allowed_tokens = {"jaxopt_llm/packing.py", "jaxopt_llm/data/batches.py", "jaxopt_llm/data/tagged.py",
                      "jaxopt_llm/bench.py"}  # data/: training data; bench: torch
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = str(file.relative_to(ROOT))
        text = file.read_text()
        if rel not in allowed_kind:
            assert not kind_reads.search(text), f"{rel} decides what a run holds: use inference.load / RunFolder.kind"
        if rel not in allowed_tokens:
            assert not tokenizer_calls.search(text), f"{rel} tokenizes texts for inference: use packing"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import pytest

    from jaxopt_llm import cli, inference
    from jaxopt_llm.errors import UserError

    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "classify", "--model", missing, "hello"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="does not exist"):  # --debug: the traceback of a user error too
        cli.main(["--debug", "predict", "classify", "--model", missing, "hello"])
    monkeypatch.setenv("JAXOPT_LLM_DEBUG", "1")
    with pytest.raises(UserError):
        cli.main(["predict", "classify", "--model", missing, "hello"])
    monkeypatch.delenv("JAXOPT_LLM_DEBUG")

    def bug(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(inference, "load", bug)
    with pytest.raises(KeyError, match="a bug"):  # not turned into `error:` and exit code 2
        cli.main(["predict", "classify", "--model", missing, "hello"])


def test_the_command_prints_the_package_warnings_as_one_line(monkeypatch):
    import warnings

    import jaxopt_llm.models.convert as convert
    from jaxopt_llm import cli
    from jaxopt_llm.models import CheckpointWarning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    cli.one_line_warnings()
    cli.one_line_warnings()  # idempotent: not wrapped twice
    ours = warnings.formatwarning("'m' has no weights for ['x']", CheckpointWarning, convert.__file__, 160,
                                  "warnings.warn(...)")
    assert ours == "warning: 'm' has no weights for ['x']\n"
    theirs = warnings.formatwarning("deprecated", DeprecationWarning, "/elsewhere/lib.py", 3, "f()")
    assert "lib.py:3: DeprecationWarning: deprecated" in theirs
