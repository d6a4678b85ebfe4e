"""Published runs the planner is calibrated on or checked against, and the inversion that calibrates.

The one calibration constant per device (``matmul_efficiency`` in devices.yaml) is the efficiency at which
this planner's own time model reproduces a measured throughput: :func:`derive_matmul_efficiency` solves
``predicted_step(eff) = measured_step`` by bisection (the step time falls monotonically as eff rises).

A100: the mean over the rows of Narayanan et al. 2021 Table 1 that have no pipeline (p = 1), so TP and DP
communication are the only overheads the inversion removes. The GPT-3 175B run on 1024 GPUs
(:data:`MEGATRON_175B`) is not among them: predicting it is an out-of-sample check.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .devices import DeviceSpec, get_device
from .layout import Layout
from .shape import ModelShape
from .timing import evaluate

MEGATRON_VOCAB = 51200      # Narayanan et al. 2021 section 5.1: V = 51,200, s = 2048
MEGATRON_SEQ = 2048

# Narayanan et al. 2021 (SC21, "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM"), Table 1: weak scaling, A100 80GB on Selene, mixed precision, full recompute.
# (params B, heads, hidden, layers, tp, pp, gpus, global batch, achieved TFLOPS per GPU)
MEGATRON_TABLE1 = (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)

# GPT-3 175B on 1024 A100s, global batch 1536 (Narayanan et al. 2021 section 5.1, "Estimating end-to-end
# training time": X = 140 TFLOPS per GPU -> 34 days for T = 300B tokens via 8TP/(nX)). The layout (TP 8 x PP 16
# x DP 8, micro-batch 1, full recompute) is the one this project's brief specifies; the paper does not list it.
MEGATRON_175B = dict(hidden=12288, layers=96, heads=96, seq=2048, vocab=51200, global_batch=1536,
                     devices=1024, tp=8, pp=16, dp=8, micro_batch_size=1, tflops_paper=140.0,
                     tflops_brief=138.0, days=34.0, tokens=300e9)

# Narayanan et al. 2021 Table 2 (PTD-P rows): GPT-3 175B (174.6B), model-parallel size 96 = TP 8 x PP 12,
# batch 1536, micro-batch 1, on 384 / 768 / 1536 GPUs -> 153 / 149 / 141 TFLOPS per GPU.
MEGATRON_TABLE2_175B = ((384, 153.0), (768, 149.0), (1536, 141.0))

# MindFormers r1.3.0 model library: Llama2-7B pre-training, seq 4096, 4160 tokens/s/p on an Atlas 800T A2
# (8 NPUs) with configs/llama2/pretrain_llama2_7b_bf16.yaml: data_parallel 8, model_parallel 1,
# pipeline_stage 1, batch_size 1, gradient_accumulation_steps 8, no recompute, parallel optimizer, bf16.
MINDFORMERS_LLAMA2_7B = dict(vocab=32000, hidden=4096, layers=32, heads=32, ffn=11008, seq=4096, devices=8,
                             dp=8, micro_batch_size=1, num_micro_batches=8, tokens_per_second_per_device=4160.0)


def megatron_gpt_shape(hidden: int, layers: int, heads: int, seq: int = MEGATRON_SEQ,
                       vocab: int = MEGATRON_VOCAB) -> ModelShape:
    """Megatron's GPT: 4h FFN (GELU), learned positions, biases, LayerNorm, tied embeddings."""
    return ModelShape(arch="gpt", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      ffn_hidden_size=4 * hidden, seq_length=seq, max_position_embeddings=seq)


def llama2_7b_shape() -> ModelShape:
    c = MINDFORMERS_LLAMA2_7B
    return ModelShape(arch="gpt", vocab_size=c["vocab"], hidden_size=c["hidden"], num_layers=c["layers"],
                      num_heads=c["heads"], ffn_hidden_size=c["ffn"], seq_length=c["seq"], gated_ffn=True,
                      tie_word_embeddings=False, position_embedding="rotary", use_bias=False, norm="rmsnorm")


def derive_matmul_efficiency(shape: ModelShape, layout: Layout, device: DeviceSpec,
                             measured_step_seconds: float, tol: float = 1e-6) -> float:
    """The matmul efficiency at which the planner's step time equals ``measured_step_seconds``."""
    if measured_step_seconds <= 0:
        raise ValueError(f"measured_step_seconds: must be > 0, got {measured_step_seconds}")

    def step(eff: float) -> float:
        return evaluate(shape, layout, replace(device, matmul_efficiency=eff)).step_seconds

    lo, hi = 1e-3, 1.0
    if step(hi) > measured_step_seconds:
        raise ValueError(f"measured step {measured_step_seconds:.4g}s is faster than the model allows even at "
                         f"efficiency 1 ({step(hi):.4g}s): communication alone exceeds it")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if step(mid) > measured_step_seconds:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def megatron_row_layout(row) -> Layout:
    _, _, _, _, tp, pp, gpus, batch, _ = row
    dp = gpus // (tp * pp)
    return Layout(dp=dp, tp=tp, pp=pp, micro_batch_size=1, num_micro_batches=batch // dp, recompute="full",
                  dtype="fp16")


def megatron_row_efficiency(row, device: Optional[DeviceSpec] = None) -> float:
    """Efficiency implied by one Table 1 row (measured TFLOPS -> step time -> inversion)."""
    device = device or get_device("A100-80GB")
    _, heads, hidden, layers, _, _, gpus, batch, tflops = row
    shape = megatron_gpt_shape(hidden, layers, heads)
    layout = megatron_row_layout(row)
    flops = evaluate(shape, layout, device).flops.hardware    # = Megatron's eq. (3) (tested)
    measured = flops / (gpus * tflops * 1e12)
    return derive_matmul_efficiency(shape, layout, device, measured)


def megatron_table1_efficiency(device: Optional[DeviceSpec] = None) -> float:
    """Mean efficiency over the Table 1 rows without pipeline parallelism (the A100 calibration)."""
    rows = [r for r in MEGATRON_TABLE1 if r[5] == 1]
    return sum(megatron_row_efficiency(r, device) for r in rows) / len(rows)


def mindformers_llama2_efficiency(device: Optional[DeviceSpec] = None) -> float:
    """Efficiency implied by the MindFormers Llama2-7B figure on the 910B (the 910B calibration)."""
    device = device or get_device("910B2")
    c = MINDFORMERS_LLAMA2_7B
    shape = llama2_7b_shape()
    layout = Layout(dp=c["dp"], micro_batch_size=c["micro_batch_size"], num_micro_batches=c["num_micro_batches"],
                    optimizer_sharding=True, recompute="none", dtype="bf16")
    measured = layout.global_batch * shape.seq_length / (c["devices"] * c["tokens_per_second_per_device"])
    return derive_matmul_efficiency(shape, layout, device, measured)


def predict_megatron_175b(device: Optional[DeviceSpec] = None):
    """The planner's LayoutPlan for GPT-3 175B on 1024 A100s (TP 8 x PP 16 x DP 8, full recompute)."""
    device = device or get_device("A100-80GB")
    c = MEGATRON_175B
    shape = megatron_gpt_shape(c["hidden"], c["layers"], c["heads"], c["seq"], c["vocab"])
    layout = Layout(dp=c["dp"], tp=c["tp"], pp=c["pp"], micro_batch_size=c["micro_batch_size"],
                    num_micro_batches=c["global_batch"] // (c["dp"] * c["micro_batch_size"]),
                    recompute="full", dtype="fp16")
    return evaluate(shape, layout, device, train_tokens=c["tokens"])
