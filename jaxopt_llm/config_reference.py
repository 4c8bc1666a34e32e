"""The configuration reference, generated from the config dataclasses: every key (`section.field`, and each
method's and task's options as `method.field`) with its type, default and meaning, the meaning being the
comment written beside the field. docs/configuration.md holds its output; a test keeps the two equal.

    python -m jaxopt_llm.config_reference                                  # print it
    python -m jaxopt_llm.config_reference --write docs/configuration.md    # replace it between the page's markers
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing


def comments(cls) -> dict[str, str]:
    """field -> the comment on its line (or on the comment lines right above it) in the class's source."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"\s+(\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "return", "@")):
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def _type(hint) -> str:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    return str(text).replace("typing.", "").replace("NoneType", "None")


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return repr(value) if not isinstance(value, str) or len(value) < 60 else "(see meaning)"


def section_rows(prefix: str, cls) -> list[dict]:
    hints = typing.get_type_hints(cls)
    notes = comments(cls)
    for base in cls.__mro__[1:]:  # fields a subclass inherits keep their comment
        if dataclasses.is_dataclass(base):
            notes = {**comments(base), **notes}
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default) or f.name in ("options", "task_options"):
            continue
        rows.append({"key": f"{prefix}.{f.name}" if prefix else f.name, "type": _type(hints.get(f.name, f.type)),
                     "default": _default(f), "meaning": notes.get(f.name, "")})
    return rows


def rows() -> list[dict]:
    """Every key a config file or a `key=value` override can set."""
    from jaxopt_llm import config, recipes

    out = section_rows("", config.Config)
    registered = {"task": recipes.task_names(), "method": recipes.method_names()}
    for r in out:
        if r["key"] in registered:
            r["meaning"] += ": " + " | ".join(registered[r["key"]])
    for section in config._SECTIONS:
        out += section_rows(section, type(getattr(config.Config(), section)))
    for name in recipes.method_names():
        options = recipes.get(name).options()
        if dataclasses.is_dataclass(options):
            out += section_rows(name, type(options))
    for name in recipes.task_names():
        cls = recipes.task_options(name)
        if cls is not None:
            out += section_rows(name, cls)
    return out


def markdown() -> str:
    """The reference as Markdown tables, one per section."""
    lines, current = [], None
    for r in rows():
        section = r["key"].split(".")[0] if "." in r["key"] else "top level"
        if section != current:
            lines += ([""] if lines else []) + [f"### {section}", "", "| key | type | default | meaning |",
                                                "|---|---|---|---|"]
            current = section
        cells = [f"`{r['key']}`", r["type"], f"`{r['default']}`", r["meaning"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


START, END = "<!-- config-reference: start -->\n", "<!-- config-reference: end -->"


def write(page: str) -> None:
    """Replace the reference between the START and END markers of the Markdown file `page`."""
    from pathlib import Path

    text = Path(page).read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page} has no {START.strip()} ... {END} markers to write between.")
    head, rest = text.split(START, 1)
    Path(page).write_text(head + START + markdown() + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write(sys.argv[2])
    else:
        print(markdown(), end="")
