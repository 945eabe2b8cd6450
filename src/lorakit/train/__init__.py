"""Training LoRA adapters: `train(model, batches, TrainConfig(...))`.

    from lorakit.train import TrainConfig, train
    result = train(model, Batches(examples, 8, seed=0, collate_fn=...), TrainConfig(max_steps=500))

AdamW with warmup and linear/cosine decay, gradient accumulation and clipping, label smoothing,
bf16 autocast on CUDA, periodic evaluation with best-adapter keeping, atomic resumable
checkpoints, metrics.jsonl + loss.png, and data parallelism under torchrun.
"""

from .checkpoint import ResumeError
from .config import TrainConfig, TrainResult
from .evaluation import evaluate
from .log import read_metrics
from .loss import causal_lm_loss, classification_loss
from .plot import plot_losses
from .schedule import lr_factor
from .trainer import train

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "ResumeError", "lr_factor", "causal_lm_loss",
           "classification_loss", "plot_losses", "read_metrics"]
