"""What a training run is told (`TrainConfig`) and what it reports back (`TrainResult`).

Every default is visible here, in one place, as in nanoGPT's `train.py`. Steps are optimizer
steps: one step consumes `grad_accum` batches of `batch_size` examples each (the global batch,
split across processes under torchrun).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hints import Setting, SettingError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    # --- optimisation (AdamW, Loshchilov & Hutter 2019; the LoRA paper uses it for every task) ---
    lr: float = 2e-4
    weight_decay: float = 0.01         # applied to matrices (A, B); never to biases or norms
    loraplus_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): B's lr = ratio × lr (A's and the
                                         # rest's); the paper suggests 2^4; None: off, one lr for all
    optimizer: str = "adamw"           # "adamw": torch's AdamW; "adamw8bit": bitsandbytes' 8-bit
                                       # AdamW (Dettmers et al. 2022; QLoRA's optimizer), 1/4 of the state
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0              # linear warmup from 0 to lr
    schedule: str = "linear"           # decay after warmup: "linear" | "cosine" (to 0) | "constant"
    max_grad_norm: float | None = 1.0  # clip the global grad norm; None: no clipping
    label_smoothing: float = 0.0       # the LoRA paper's E2E runs use 0.1 (Table 11)
    # --- how long, how big ---
    max_steps: int | None = None       # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8                # examples per batch, across all processes
    grad_accum: int = 1                # batches per optimizer step
    # --- evaluation, checkpoints, logs ---
    eval_every: int = 100              # steps; used when eval_batches or eval_fn is given
    save_every: int = 100              # steps between resumable checkpoints (and one at the end)
    log_every: int = 10                # steps per metrics.jsonl row (the loss is their mean)
    keep_best: bool = True             # keep the adapter with the lowest eval loss in out_dir/best
    early_stopping_patience: int | None = None  # stop after this many evals without improvement
    # --- run ---
    seed: int = 0
    out_dir: str | Path = "runs/lora"
    overwrite: bool = False            # start afresh in an out_dir that holds a run; the old run is
                                       # replaced at the new one's first checkpoint, not before
    device: str = "auto"               # "auto": cuda if available (cuda:LOCAL_RANK under torchrun)
    fsdp: bool = False                 # under torchrun, shard the model across processes (FSDP2) instead
                                       # of a full copy per process (DDP): for a base too big for one device
    precision: str = "auto"            # "auto": bf16 autocast on CUDA, float32 on CPU
    compile: str = "auto"              # torch.compile the training forward: "auto": on CUDA only; "on" | "off"
    progress: bool = True              # tqdm bar and a few printed lines, on rank 0 only

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # a JSON round trip gives a list
        if isinstance(self.compile, bool):  # YAML reads `compile: off` as False
            self.compile = "on" if self.compile else "off"
        # One sentence per bad value, each naming its option as a `Setting`, so the command line
        # can say `--lr` where Python users read `lr`.
        problems: list[list[str | Setting]] = []
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("compile", COMPILE_MODES),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                problems.append([Setting(name, getattr(self, name)), f" is not one of {allowed}"])
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append([Setting(name), f" must be >= 1, got {getattr(self, name)}"])
        if self.max_steps is not None and self.max_steps < 1:
            problems.append([Setting("max_steps"), " must be >= 1 (or leave it unset to run ", Setting("epochs"),
                             f" passes over the data), got {self.max_steps}"])
        if self.max_steps is None and not self.epochs > 0:
            problems.append([Setting("epochs"), " must be > 0 (or set ", Setting("max_steps"),
                             f" to count optimizer steps instead), got {self.epochs}"])
        if not self.lr > 0:
            problems.append([Setting("lr"), f" (the peak learning rate) must be > 0, got {self.lr}"])
        ratio = self.loraplus_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio < float("inf")):
            problems.append([Setting("loraplus_ratio"), f" (B's lr / A's lr) must be a positive number (unset: off), "
                             f"got {self.loraplus_ratio!r}"])
        if self.weight_decay < 0:
            problems.append([Setting("weight_decay"), f" must be >= 0, got {self.weight_decay}"])
        if self.warmup_steps < 0:
            problems.append([Setting("warmup_steps"),
                             f" (steps of linear warmup) must be >= 0, got {self.warmup_steps}"])
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append([Setting("label_smoothing"), f" must be in [0, 1), got {self.label_smoothing}"])
        if self.seed < 0:
            problems.append([Setting("seed"), f" must be >= 0, got {self.seed}"])
        if problems:
            raise SettingError.joined(problems, prefix="bad training settings: ")

    def compiles_on(self, device_type: str) -> bool:
        """Whether the training step runs under torch.compile on a device of this type ("cuda", "cpu")."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda")

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


@dataclass
class TrainResult:
    """What `train` did. Paths point into `out_dir`; `best_dir` is None when nothing was evaluated."""

    steps: int                          # optimizer steps done (the last one's number)
    train_loss: float | None            # mean loss of the last logged window
    eval_metrics: dict[str, float]      # the last evaluation (eval_loss, eval_accuracy, eval_fn's)
    best_step: int | None
    best_eval_loss: float | None
    stopped_early: bool
    tokens: int                         # non-padding input tokens seen, all processes together
    trainable_parameters: int
    total_parameters: int
    out_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    checkpoint_dir: Path
    metrics_path: Path
    plot_path: Path | None
    run_path: Path
