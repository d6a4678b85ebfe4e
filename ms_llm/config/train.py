"""Training and data configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .base import check, check_choice

SCHEDULES = ("constant", "cosine", "linear", "inverse_sqrt")
TASKS = ("reverse", "sort", "copy", "causal_lm", "span_corruption", "mlm", "classification")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234                      # seeds numpy, mindspore and the data order
    steps: int = 200                      # optimizer updates to run
    batch_size: int = 32                  # sequences per optimizer update (global, all micro-batches together)
    grad_accum_steps: int = 1             # micro-batches per update; each holds batch_size / grad_accum_steps
    lr: float = 1e-3                      # peak learning rate
    min_lr: float = 0.0                   # floor of cosine/linear decay
    warmup_steps: int = 20                # linear warm-up steps
    schedule: str = "cosine"              # constant | cosine | linear | inverse_sqrt (Vaswani: d^-0.5 * min(...))
    weight_decay: float = 0.01            # AdamW decoupled decay; never applied to norms and biases
    adam_betas: Tuple[float, ...] = (0.9, 0.999)  # Adam beta1, beta2
    adam_eps: float = 1e-8                # Adam epsilon
    grad_clip: float = 1.0                # global-norm clipping threshold (0 = off)
    label_smoothing: float = 0.0          # label-smoothed cross entropy (Vaswani uses 0.1)
    loss_scale: float = 65536.0           # initial dynamic loss scale (used when model.compute_dtype is float16)
    loss_scale_factor: float = 2.0        # scale is divided by this on overflow, multiplied after a window
    loss_scale_window: int = 1000         # overflow-free steps before the scale grows
    log_every: int = 10                   # steps between log lines
    eval_every: int = 0                   # steps between evaluations (0 = only at the end)
    save_every: int = 0                   # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2             # newest checkpoints kept on disk
    init_from: Optional[str] = None       # HF-layout dir or ms_llm run dir whose weights start training
    output_dir: str = "runs/default"      # checkpoints, metrics.jsonl, loss curve, resolved config
    peak_tflops: float = 0.0              # device peak for MFU (0 = measure this machine's fp32 matmul peak)
    progress_bar: bool = True             # tqdm bar while training

    def __post_init__(self):
        k = "train"
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"{k}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.batch_size % self.grad_accum_steps == 0, f"{k}.batch_size",
              f"{self.batch_size} is not divisible by grad_accum_steps={self.grad_accum_steps}")
        check(self.lr > 0, f"{k}.lr", f"must be > 0, got {self.lr}")
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "eval_every", "save_every",
                     "peak_tflops", "adam_eps"):
            check(getattr(self, name) >= 0, f"{k}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.label_smoothing < 1.0, f"{k}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check_choice(self.schedule, f"{k}.schedule", SCHEDULES)
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), f"{k}.adam_betas",
              f"must be two numbers in [0, 1), got {self.adam_betas}")
        check(self.loss_scale >= 1 and self.loss_scale_factor > 1 and self.loss_scale_window >= 1,
              f"{k}.loss_scale", "needs loss_scale >= 1, loss_scale_factor > 1, loss_scale_window >= 1")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps


@dataclass(frozen=True)
class DataConfig:
    task: str = "causal_lm"               # reverse | sort | copy (seq2seq, generated) | causal_lm | span_corruption
    #                                       (T5 pre-training of transformer / switch) | mlm | classification
    corpus: Optional[str] = None          # text file for causal_lm / span_corruption / mlm (None = the shipped corpus)
    tokenizer: Optional[str] = None       # vocab.txt (WordPiece), tokenizer.json, or a folder with vocab.json+merges.txt
    seq_length: int = 32                  # tokens per training sequence (span_corruption: per window, before corruption)
    src_length: int = 16                  # generated seq2seq: source tokens (content length, before BOS/EOS)
    min_length: int = 4                   # generated seq2seq: shortest content length
    num_train: int = 20000                # generated examples for training
    num_eval: int = 200                   # held-out examples for evaluation
    mlm_probability: float = 0.15         # BERT: fraction of tokens selected for prediction
    max_predictions_per_seq: int = 20     # BERT: fixed number of prediction slots per sequence
    whole_word_masking: bool = False      # BERT: mask all word pieces of a chosen word together
    nsp_probability: float = 0.5          # BERT: probability the second segment is a random one
    noise_density: float = 0.15           # span_corruption: fraction of each window's tokens hidden (T5: 0.15)
    mean_noise_span_length: float = 3.0   # span_corruption: mean length of a hidden span (T5: 3)
    num_sentinels: int = 100              # span_corruption: sentinel ids reserved at the top of model.vocab_size (T5: 100)
    num_workers: int = 1                  # mindspore.dataset parallel workers

    def __post_init__(self):
        k = "data"
        check_choice(self.task, f"{k}.task", TASKS)
        for name in ("seq_length", "src_length", "min_length", "num_train", "num_eval", "max_predictions_per_seq",
                     "num_workers"):
            check(getattr(self, name) >= 1, f"{k}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.min_length <= self.src_length, f"{k}.min_length",
              f"{self.min_length} > src_length={self.src_length}")
        check(0.0 < self.mlm_probability < 1.0, f"{k}.mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        check(0.0 <= self.nsp_probability <= 1.0, f"{k}.nsp_probability", f"must be in [0, 1], got {self.nsp_probability}")
        check(0.0 < self.noise_density < 1.0, f"{k}.noise_density", f"must be in (0, 1), got {self.noise_density}")
        check(self.mean_noise_span_length >= 1.0, f"{k}.mean_noise_span_length",
              f"must be >= 1, got {self.mean_noise_span_length}")
        check(self.num_sentinels >= 1, f"{k}.num_sentinels", f"must be >= 1, got {self.num_sentinels}")
        if self.task == "span_corruption":
            from ..data.span_corruption import span_corruption_lengths
            check(self.seq_length >= 2, f"{k}.seq_length", f"span corruption needs windows of >= 2 tokens, "
                                                            f"got {self.seq_length}")
            n = span_corruption_lengths(self.seq_length, self.noise_density, self.mean_noise_span_length)
            check(n.num_spans <= self.num_sentinels, f"{k}.num_sentinels",
                  f"{self.num_sentinels} < the {n.num_spans} noise spans of a window of seq_length={self.seq_length}")
            check(n.num_spans <= self.seq_length - n.num_noise, f"{k}.noise_density",
                  f"{self.noise_density} hides {n.num_noise} of {self.seq_length} tokens in {n.num_spans} spans, "
                  f"leaving too few visible tokens to separate the spans (raise data.mean_noise_span_length)")
        import os
        for name in ("corpus", "tokenizer"):
            p = getattr(self, name)
            if p is not None:
                check(os.path.exists(p), f"{k}.{name}", f"file not found: {p}")
