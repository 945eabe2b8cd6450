"""lorakit: Low-Rank Adaptation (Hu et al. 2021) for PyTorch models.

    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(model, cfg)            # in place; freezes everything but the adapter
    lorakit.save_adapter(model, "out/adapter")    # PEFT layout, loadable by PEFT
    step = lorakit.compile(model)                 # torch.compile, adapted layers' inputs remade in backward

    model, tokenizer = lorakit.load_model("default")  # the embedded SmolLM2-135M-Instruct, no download
"""

from .compiling import compile
from .adapters import active_adapters, adapter_names, disabled, merge, switch, trainable_parameters, unmerge, use
from .combine import combine
from .config import ConfigError, LoraConfig
from .inject import delete_adapter, inject, unload
from .io import AdapterFileError, load_adapter, save_adapter
from .layers import LoraLayer, MergeError
from .routing import route

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "save_adapter", "load_adapter", "use", "disabled", "merge", "unmerge",
    "switch", "route", "unload", "trainable_parameters", "delete_adapter", "active_adapters", "adapter_names",
    "LoraLayer", "ConfigError", "AdapterFileError", "MergeError", "load_model", "compile",
    "combine",
]


def __getattr__(name: str):
    # `lorakit.load_model` is lorakit.models.load_model, imported on first use: it brings in
    # transformers, which `import lorakit` alone does not need (PEP 562).
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
