"""The families, keyed by Hugging Face `model_type`. Entries are import strings, loaded on first use, so
reading the table imports no family; `register` adds one from outside the package (a test, a user's code)."""

from __future__ import annotations

import importlib
from typing import Any

from jaxopt_llm.models.family import Family
from jaxopt_llm.models.hub import CheckpointError

_FAMILIES: dict[str, Any] = {
    "bert": "jaxopt_llm.models.bert.params:FAMILY",
    "roberta": "jaxopt_llm.models.roberta.params:ROBERTA",
    "xlm-roberta": "jaxopt_llm.models.roberta.params:XLM_ROBERTA",
    "distilbert": "jaxopt_llm.models.distilbert.params:DISTILBERT",
    "electra": "jaxopt_llm.models.electra.params:ELECTRA",
    "deberta-v2": "jaxopt_llm.models.deberta_v2.params:DEBERTA_V2",
    "modernbert": "jaxopt_llm.models.modernbert.params:MODERNBERT",
}


def register(family: Family) -> Family:
    """Add (or replace) the family of `family.model_type`."""
    _FAMILIES[family.model_type] = family
    return family


def names() -> list[str]:
    return list(_FAMILIES)


def get(model_type: str) -> Family:
    entry = _FAMILIES.get(model_type)
    if entry is None:
        raise CheckpointError(f"model_type {model_type!r} is not a family jaxopt_llm loads; the families are "
                              f"{', '.join(_FAMILIES)}.")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _FAMILIES[model_type] = getattr(importlib.import_module(module), attr)
    return entry


def of_config(hf: dict, where: str = "") -> Family:
    """The family of a config.json's dict (model_type "bert" when it names none)."""
    model_type = hf.get("model_type", "bert")
    try:
        return get(model_type)
    except CheckpointError as err:
        raise CheckpointError(f"{where + ': ' if where else ''}{err}") from None


def of_model(model: Any) -> Family:
    """The family whose module class built `model`."""
    for name in list(_FAMILIES):
        family = get(name)
        if type(model) is family.module:
            return family
    raise CheckpointError(f"{type(model).__name__} is not the module of a registered family.")
