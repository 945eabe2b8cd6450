"""`make demo`: LoRA fine-tuning of the embedded SmolLM2-135M-Instruct on the generated demo task,
with the model's answers before and after, on CPU in a few minutes, with no files and no network.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import LoraConfig
from .data import demo_task
from .demo_task import LINE_PATTERN
from .finetune import DEMO_DATA, DataSpec, finetune
from .generate import generate_text
from .models import load_causal_lm
from .train import TrainConfig

SHOW = 3          # examples printed before/after
SCORE = 24        # held-out examples scored for format and exact match


def run_demo(out_dir: str = "runs/demo", steps: int = 60, batch_size: int = 8, lr: float = 1e-3,
             rank: int = 8, seed: int = 0, device: str = "auto") -> dict[str, float]:
    start = time.perf_counter()
    print("lorakit demo: LoRA on SmolLM2-135M-Instruct, teaching it a house style it does not know.\n"
          "The task is GENERATED (lorakit.demo_task): fictional departure records -> one board line.\n")
    model, tokenizer = load_causal_lm("default")
    data = DataSpec(train=DEMO_DATA, seq_len=128, chat_template=True, demo_examples=(2000, SCORE))
    _, held_out = demo_task(*data.demo_examples)
    prompts = [ex.prompt for ex in held_out]
    targets = [ex.completion for ex in held_out]

    print(f"the untrained model answers the {len(prompts)} held-out records first (the 'before'), then it trains",
          flush=True)
    before = _answers(model, tokenizer, prompts)
    lora = LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules="all-linear")
    config = TrainConfig(lr=lr, max_steps=steps, warmup_steps=steps // 10, batch_size=batch_size,
                         eval_every=max(steps // 3, 1), save_every=max(steps // 3, 1), log_every=5,
                         seed=seed, out_dir=out_dir, overwrite=True, device=device)
    result, model, tokenizer = finetune("default", data, lora, config, model=model, tokenizer=tokenizer)
    after = _answers(model, tokenizer, prompts)

    for i in range(SHOW):
        print(f"\n--- held-out example {i + 1} ---\n{prompts[i]}\n"
              f"  expected: {targets[i]}\n  before:   {_one_line(before[i])}\n  after:    {_one_line(after[i])}")
    scores = {
        "format_before": _rate(before, lambda a, t: bool(LINE_PATTERN.match(a)), targets),
        "format_after": _rate(after, lambda a, t: bool(LINE_PATTERN.match(a)), targets),
        "exact_before": _rate(before, lambda a, t: a == t, targets),
        "exact_after": _rate(after, lambda a, t: a == t, targets),
    }
    print(f"\non {len(prompts)} held-out records: in the house format {scores['format_before']:.0%} before, "
          f"{scores['format_after']:.0%} after; exactly right {scores['exact_before']:.0%} before, "
          f"{scores['exact_after']:.0%} after")
    print(f"run directory: {Path(out_dir).resolve()} (adapter/, metrics.jsonl, loss.png); "
          f"took {time.perf_counter() - start:.0f} s")
    return scores


def _answers(model, tokenizer, prompts: list[str]) -> list[str]:
    return generate_text(model, tokenizer, prompts, chat_template=True, max_new_tokens=40, batch_size=len(prompts))


def _rate(answers: list[str], ok, targets: list[str]) -> float:
    return sum(ok(a, t) for a, t in zip(answers, targets)) / len(answers)


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."
