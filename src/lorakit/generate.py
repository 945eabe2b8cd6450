"""Batched text generation from a causal LM, for `lorakit generate` and E2E evaluation.

Decoding is transformers' `generate` (greedy or beam search, KV cache on); this module owns what
lorakit has to get right around it:

- prompts are encoded exactly as training encoded them (`lorakit.data.encode_prompt`), so a
  fine-tuned model sees the prompt/completion boundary it learned;
- prompts are left-padded within a batch, with an attention mask from which `generate` derives
  position ids that start at 0 on each prompt's first real token, so a prompt's output does not
  depend on which prompts share its batch (the tests check this token for token);
- decoding depends only on the arguments given here, never on defaults in the model's
  `generation_config` (a checkpoint's `repetition_penalty` or `do_sample=True` would change the
  outputs that an evaluation reports);
- the model's train/eval state is restored, so generating in the middle of training is harmless.

The LoRA paper decodes E2E with beam search (Appendix D.3): `num_beams=10, length_penalty=0.8,
no_repeat_ngram_size=4`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lorakit.data import encode_prompt
from lorakit.hints import Setting, SettingError
from lorakit.prefix import PrefixEmbedding, insert_placeholders

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate_ids(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    batch_size: int = 16,
    progress: bool = True,
    prefix: PrefixEmbedding | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return only the new tokens, in prompt order.

    Greedy when `num_beams == 1`, else beam search that stops as soon as `num_beams` finished
    hypotheses exist (`early_stopping=True`); `length_penalty` only matters for beams, and
    `no_repeat_ngram_size` counts the prompt's n-grams too (as transformers does). Each output
    stops before the first `eos_token_id` (one id, or several: any of them) and holds no padding. `pad_token_id` only fills masked
    places, so any id will do (None: eos, else 0).

    Every prompt must fit with its new tokens in the model's positions (`max_position_embeddings`);
    one that does not is refused up front, by index, since past those positions absolute position
    embeddings fail mid-run and rotary ones decode noise. Prompts are sorted by length before
    batching, so a batch holds little padding; a progress bar over batches shows when there is
    more than one batch and `progress` is true.

    ``prefix`` (LoRA + prefix embeddings, `lorakit.prefix`) goes in front of every prompt, after its
    left padding: placeholder ids whose embeddings are the prefix rows, so the prompt positions
    count on from n_prefix, as in training; it counts against the model's positions.
    """
    n_prefix = prefix.n_prefix if prefix is not None else 0
    _check(model, prompts, max_new_tokens, num_beams, no_repeat_ngram_size, batch_size, n_prefix)
    ends = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else ends[0] if ends else 0
    config = _generation_config(max_new_tokens, num_beams, length_penalty, no_repeat_ngram_size,
                                ends or None, pad)
    device = _device(model)
    # Longest first: a batch that runs out of memory does so at once, not at the end of a long run.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[list[int]] = [[] for _ in prompts]
    with _eval_mode(model), _own_generation_config(model), torch.inference_mode():
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress or len(batches) < 2):
            input_ids, attention_mask = _left_pad([prompts[i] for i in batch], pad, device)
            embeds = {}
            if prefix is not None:
                # generate() starts from inputs_embeds and returns input_ids + the new tokens
                input_ids, attention_mask, _, starts = insert_placeholders(input_ids, attention_mask, n_prefix, pad)
                embeds = {"inputs_embeds": prefix.to(device).inputs_embeds(model, input_ids, starts)}
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=config, **embeds)
            new = out[:, input_ids.shape[1]:].tolist()  # (batch, ≤ max_new_tokens): prompt dropped
            for i, tokens in zip(batch, new):
                results[i] = _until_eos(tokens, ends)
    return results


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    chat_template: bool = False,
    separator: str = "\n",
    **kw: Any,
) -> list[str]:
    """Generate a completion for each prompt string; `kw` goes to `generate_ids`.

    `chat_template` and `separator` must be what training used (`tokenize_example`): the model
    learned to continue exactly that token sequence. Generation ends at the ids of `end_ids` and
    pads with the tokenizer's pad id, unless `kw` names others. Special tokens are dropped from the text and whitespace is stripped.
    """
    if not prompts:
        raise ValueError("no prompts to generate from; pass at least one prompt")
    ids = [encode_prompt(p, tokenizer, chat_template=chat_template, separator=separator) for p in prompts]
    kw.setdefault("eos_token_id", end_ids(model, tokenizer) or None)
    kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    new = generate_ids(model, ids, **kw)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]


# --- the pieces ----------------------------------------------------------------------------------

def _check(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           num_beams: int, no_repeat_ngram_size: int, batch_size: int, n_prefix: int = 0) -> None:
    """Fail before any work, naming the offending prompt, rather than deep inside a forward."""
    if not prompts:
        raise ValueError("no prompts to generate from; pass at least one prompt")
    for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("num_beams", num_beams, 1),
                               ("batch_size", batch_size, 1),
                               ("no_repeat_ngram_size", no_repeat_ngram_size, 0)):
        if value < least:
            raise SettingError(Setting(name), f" must be at least {least}, got {value}")
    limit = getattr(model.config, "max_position_embeddings", None)  # GPT-2 maps n_positions here
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens; a causal LM needs at least one to start "
                             "from (use a tokenizer that adds BOS, or a non-empty prompt)")
        # The last new token is returned but never fed back, so it needs no position.
        length = len(prompt) + n_prefix
        if limit is not None and length + max_new_tokens - 1 > limit:
            what = ("is longer than the model's" if length > limit else
                    f"leaves room for only {limit - length + 1} new tokens in the model's")
            with_prefix = f" (with the {n_prefix} prefix embeddings)" if n_prefix else ""
            raise SettingError(f"prompt {i} has {length} tokens{with_prefix}, which {what} {limit} positions "
                               "(", Setting("max_new_tokens", max_new_tokens), "); shorten the prompt or lower ",
                               Setting("max_new_tokens"))


def _generation_config(max_new_tokens: int, num_beams: int, length_penalty: float,
                       no_repeat_ngram_size: int, eos: int | None, pad: int) -> Any:
    from transformers import GenerationConfig

    beam = {"length_penalty": length_penalty, "early_stopping": True} if num_beams > 1 else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, num_return_sequences=1,
        no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        return_dict_in_generate=False, **beam)


@contextmanager
def _own_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """`generate` fills every setting left None in the config it is given from the model's
    `generation_config` (a checkpoint's `repetition_penalty`, `min_length`, `bad_words_ids`, ...),
    and None cannot be pinned by passing it. A blank default config stands in meanwhile, so the
    tokens depend only on generate_ids' arguments."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _left_pad(prompts: list[Sequence[int]], pad: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the last column, where generation continues."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _until_eos(tokens: list[int], ends: Sequence[int]) -> list[int]:
    """Cut at the first end id: after it, `generate` only pads the row to the batch's longest."""
    cut = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    return tokens[:cut]


def end_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS (what training appends to every
    completion) and every id the model's generation config names (chat models such as Llama-3
    end a turn with another token), where transformers' generate stops too. The first is the
    tokenizer's."""
    ids: list[int] = []
    named = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (getattr(tokenizer, "eos_token_id", None), named):
        for i in [source] if isinstance(source, int) else list(source or []):
            if i not in ids:
                ids.append(int(i))
    return ids


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() for generation (no dropout, LoRA's included); then each module's own mode back,
    since `model.train(was_training)` would overwrite a submodule deliberately kept in eval."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
