"""jaxopt_llm: BERT-style encoders in JAX / Flax NNX, from Hugging Face checkpoints to deployment.

The table of contents: the model and its checkpoints, run configs, training (`jaxopt_llm.train.train`
assembles a run from a config, `fit` runs any recipe), prediction, and the registry of tasks and methods.
Names load on first use, so that light modules (an exported artifact's loader) import without flax or
transformers. A name that is also a submodule (`train`) is the submodule, as `import jaxopt_llm.train`
makes it: one attribute cannot be both.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

_EXPORTS = {
    "Bert": "jaxopt_llm.models.bert", "BertConfig": "jaxopt_llm.models.bert", "CheckpointError": "jaxopt_llm.models.bert",
    "from_pretrained": "jaxopt_llm.models.bert", "save_pretrained": "jaxopt_llm.models.bert",
    "Config": "jaxopt_llm.config", "ConfigError": "jaxopt_llm.config", "load_config": "jaxopt_llm.config:load",
    "fit": "jaxopt_llm.train",
    "load_model": "jaxopt_llm.inference:load", "Inference": "jaxopt_llm.inference",
    "Recipe": "jaxopt_llm.recipes", "Context": "jaxopt_llm.recipes", "Method": "jaxopt_llm.recipes",
    "register": "jaxopt_llm.recipes", "register_task": "jaxopt_llm.recipes",
    "RunFolder": "jaxopt_llm.runs", "keep_freed_memory": "jaxopt_llm.heap",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        if importlib.util.find_spec(f"jaxopt_llm.{name}") is not None:
            return importlib.import_module(f"jaxopt_llm.{name}")
        raise AttributeError(f"module 'jaxopt_llm' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    return getattr(importlib.import_module(module), attr or name)


def __dir__():
    return __all__
