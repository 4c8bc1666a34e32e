"""Model families keyed by Hugging Face `model_type` (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA,
DeBERTa-v2/v3, ModernBERT), and the checkpoint and tokenizer handling every family shares. Nothing outside a
family's own folder names the family: load with `from_pretrained` (the family comes from config.json), save
with `save_pretrained`.

Adding a family: `models/<family>/modeling.py` (a config dataclass and an NNX module with the encoder
protocol: `embed`, `encode`, `heads`, `classify_logits`, `mlm_logits`), `params.py` (its `Family`: the HF
key table), and one line in `registry._FAMILIES` -- or `register(family)` from your own code.
"""

from jaxopt_llm.models.convert import from_pretrained, save_pretrained, to_hf_tensors
from jaxopt_llm.models.family import Family
from jaxopt_llm.models.hub import CheckpointError, CheckpointWarning, load_tokenizer, read_config, resolve
from jaxopt_llm.models.registry import get, names, of_config, of_model, register


def task_of(folder) -> str:
    """The task a checkpoint folder was saved for, from config.json's architectures ("base" if none)."""
    hf = read_config(folder)
    return of_config(hf, str(folder)).task_of(hf.get("architectures") or []) or "base"


def config_of(folder):
    """The family config of a checkpoint folder (its positions, sizes, labels)."""
    hf = read_config(folder)
    return of_config(hf, str(folder)).config.from_hf_config(hf)


__all__ = ["CheckpointError", "CheckpointWarning", "Family", "config_of", "from_pretrained", "get",
           "load_tokenizer", "names", "of_config", "of_model", "read_config", "register", "resolve",
           "save_pretrained", "task_of", "to_hf_tensors"]
