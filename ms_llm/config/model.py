"""Model and MoE configs: one dataclass describes every architecture in ms_llm."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .base import check, check_choice

ARCHS = ("transformer", "bert", "gpt", "switch", "glam")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swiglu", "geglu", "reglu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rotary", "relative", "none")
ATTENTION_PATTERNS = ("dense", "alternating_banded")
ATTENTION_IMPLS = ("auto", "reference", "fused")
ROUTERS = ("topk", "noisy_topk", "expert_choice")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 0                  # experts per MoE layer; 0 = dense model
    top_k: int = 1                        # experts per token (1 Switch, 2 GLaM/GShard; tokens per expert is capacity)
    router: str = "topk"                  # 'topk' (Switch/GShard), 'noisy_topk' (Shazeer 2017), 'expert_choice'
    router_impl: str = "auto"             # top-k routing: 'reference' (ops), 'fused' (custom kernel; router 'topk'
                                          # only), 'auto' = fused for 'topk' on CPU, reference otherwise
    dispatch_impl: str = "auto"           # dispatch/combine: 'reference' (ops), 'fused' (CPU kernels), 'auto' =
                                          # fused on CPU, reference elsewhere (ms_llm.kernels.moe_dispatch)
    moe_every: int = 2                    # an MoE feed-forward in every n-th layer (1 = all layers)
    moe_offset: int = 1                   # layer i is MoE iff i % moe_every == moe_offset % moe_every
    expert_ffn_hidden_size: Optional[int] = None  # expert FFN width; None = model.ffn_hidden_size
    capacity_factor_train: float = 1.25   # capacity = ceil(tokens * top_k * factor / experts) while training
    capacity_factor_eval: float = 2.0     # same at evaluation
    min_capacity: int = 1                 # floor on expert capacity
    normalize_top_k: bool = True          # renormalise the k chosen gate values to sum to 1 (GShard/GLaM top-2)
    second_expert_policy: str = "all"     # GShard 2nd expert: 'all' (always) or 'sampling' (keep w.p. 2*g2)
    load_balance_coef: float = 0.01       # Switch loss alpha * N * sum_i f_i P_i
    z_loss_coef: float = 0.001            # ST-MoE router z-loss weight
    importance_coef: float = 0.0          # Shazeer importance loss weight (w_importance)
    load_coef: float = 0.0                # Shazeer load loss weight (w_load)
    jitter_eps: float = 0.0               # Switch multiplicative jitter on router input while training (0 = off)
    noise_epsilon: float = 1e-2           # Shazeer: floor added to Softplus(x W_noise) for stability
    expert_dropout: float = 0.0           # dropout inside experts (Switch fine-tuning uses 0.4)
    router_bias: bool = False             # bias in the router projection
    expert_capacity: int = 0              # fixed slots per expert and routing group (HF Switch 'expert_capacity');
                                          # 0 = ceil(tokens * top_k * capacity_factor / experts)
    expert_activation: Optional[str] = None  # expert FFN activation; None = model.activation (GLaM: GeGLU dense
                                          # feed-forwards, plain GELU experts)

    def __post_init__(self):
        k = "moe"
        check(self.num_experts >= 0, f"{k}.num_experts", f"must be >= 0, got {self.num_experts}")
        check_choice(self.router, f"{k}.router", ROUTERS)
        check_choice(self.second_expert_policy, f"{k}.second_expert_policy", ("all", "sampling"))
        check_choice(self.router_impl, f"{k}.router_impl", ("auto", "reference", "fused"))
        check_choice(self.dispatch_impl, f"{k}.dispatch_impl", ("auto", "reference", "fused"))
        check(self.router_impl != "fused" or self.router == "topk", f"{k}.router_impl",
              f"'fused' is implemented for router 'topk' only, got router '{self.router}'")
        if self.num_experts:
            check(1 <= self.top_k <= self.num_experts, f"{k}.top_k",
                  f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        check(self.moe_every >= 1, f"{k}.moe_every", f"must be >= 1, got {self.moe_every}")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            check(getattr(self, name) > 0, f"{k}.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("load_balance_coef", "z_loss_coef", "importance_coef", "load_coef", "jitter_eps",
                     "noise_epsilon"):
            check(getattr(self, name) >= 0, f"{k}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.expert_dropout < 1.0, f"{k}.expert_dropout", f"must be in [0, 1), got {self.expert_dropout}")
        check(self.min_capacity >= 1, f"{k}.min_capacity", f"must be >= 1, got {self.min_capacity}")
        check(self.expert_capacity >= 0, f"{k}.expert_capacity", f"must be >= 0, got {self.expert_capacity}")
        if self.expert_activation is not None:
            check_choice(self.expert_activation, f"{k}.expert_activation", ACTIVATIONS)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (0-based) has a sparse feed-forward."""
        return self.num_experts > 0 and i % self.moe_every == self.moe_offset % self.moe_every


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"                     # one of ms_llm.models.MODELS: transformer, bert, gpt, switch, glam
    vocab_size: int = 512                 # tokens in the vocabulary (shared source/target for enc-dec)
    hidden_size: int = 64                 # d_model
    num_layers: int = 2                   # encoder layers (enc-dec, bert) or decoder layers (decoder-only)
    num_decoder_layers: Optional[int] = None  # decoder layers of enc-dec models; None = num_layers
    num_heads: int = 4                    # attention heads
    num_kv_heads: Optional[int] = None    # key/value heads (grouped-query attention); None = num_heads
    head_dim: Optional[int] = None        # per-head width; None = hidden_size // num_heads
    ffn_hidden_size: int = 256            # feed-forward inner width (d_ff)
    max_position_embeddings: int = 128    # longest sequence (learned positions table / rotary cache)
    activation: str = "gelu"              # FFN activation; swiglu/geglu/reglu are gated (3 matrices)
    norm: str = "layernorm"               # 'layernorm' or 'rmsnorm'
    norm_eps: float = 1e-5                # epsilon of the norms
    norm_bias: bool = True                # LayerNorm with bias (False = scale-only, T5/Switch style)
    pre_norm: bool = True                 # pre-norm (GPT) or post-norm (original Transformer, BERT) residuals
    final_norm: bool = True               # a norm after the last pre-norm block
    position_embedding: str = "learned"   # learned, sinusoidal (Vaswani), rotary (RoPE), relative (T5), none
    rope_theta: float = 10000.0           # RoPE base
    relative_num_buckets: int = 32        # T5 relative position buckets
    relative_max_distance: int = 128      # T5 relative position max distance
    type_vocab_size: int = 0              # segment (token type) embeddings; BERT uses 2
    use_bias: bool = True                 # biases in attention and FFN projections
    dropout: float = 0.1                  # residual, embedding and FFN dropout (attention probabilities are not
                                          # dropped: the fused kernels keep no probability matrix to drop from)
    tie_word_embeddings: bool = True      # output projection shares the input embedding matrix
    scale_embeddings: bool = False        # multiply token embeddings by sqrt(hidden) (Vaswani)
    attention_pattern: str = "dense"      # 'dense' or GPT-3's 'alternating_banded' (odd layers banded)
    band_width: int = 256                 # banded layers: each query sees itself and band_width-1 previous keys
    attention_impl: str = "auto"          # 'reference' (composite ops), 'fused' (flash kernel / Ascend FA) or
                                          # 'auto': fused on CPU, reference elsewhere
    initializer_range: float = 0.02       # std of the normal weight init
    pad_token_id: int = 0                 # padding id (masked out of attention and loss)
    bos_token_id: int = 1                 # beginning of sequence / decoder start
    eos_token_id: int = 2                 # end of sequence (stops generation)
    num_labels: int = 2                   # classes of fine-tuning heads (classification, tagging)
    compute_dtype: str = "float32"        # matmul dtype inside cells; norms, softmax and routers stay float32
    moe: MoEConfig = field(default_factory=MoEConfig)  # sparse feed-forward settings (num_experts 0 = dense)

    def __post_init__(self):
        check_choice(self.arch, "model.arch", ARCHS)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "max_position_embeddings"):
            check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.head_dim is None:
            check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
                  f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        else:
            check(self.head_dim > 0, "model.head_dim", f"must be > 0, got {self.head_dim}")
        if self.num_kv_heads is not None:
            check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                  f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.num_decoder_layers is not None:
            check(self.num_decoder_layers > 0, "model.num_decoder_layers", "must be > 0")
        check_choice(self.activation, "model.activation", ACTIVATIONS)
        check_choice(self.norm, "model.norm", NORMS)
        check_choice(self.position_embedding, "model.position_embedding", POSITIONS)
        check_choice(self.attention_pattern, "model.attention_pattern", ATTENTION_PATTERNS)
        check_choice(self.attention_impl, "model.attention_impl", ATTENTION_IMPLS)
        check_choice(self.compute_dtype, "model.compute_dtype", DTYPES)
        check(self.norm_eps > 0, "model.norm_eps", f"must be > 0, got {self.norm_eps}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.type_vocab_size >= 0, "model.type_vocab_size", "must be >= 0")
        check(self.band_width >= 1, "model.band_width", f"must be >= 1, got {self.band_width}")
        if self.position_embedding == "rotary":
            check(self.dim_per_head % 2 == 0, "model.head_dim", "rotary embeddings need an even head dim")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            check(0 <= v < self.vocab_size, f"model.{name}", f"{v} is outside the vocabulary [0, {self.vocab_size})")
        check(self.num_labels >= 1, "model.num_labels", "must be >= 1")
        if self.moe.num_experts and self.arch not in ("switch", "glam", "gpt", "transformer"):
            check(False, "model.moe.num_experts", f"arch '{self.arch}' has no MoE variant")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    @property
    def is_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS
