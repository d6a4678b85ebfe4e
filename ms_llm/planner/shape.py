"""ModelShape: the few numbers the planner needs about a model, independent of the config classes.

``ModelShape.from_config`` reads a ``ModelConfig`` by attribute (duck typing), so the planner does not import
``ms_llm.config``; tests build shapes directly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

ARCHS = ("transformer", "bert", "gpt", "switch", "glam")
ENCODER_DECODER = ("transformer", "switch")
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rotary", "relative", "none")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Transformer-family model plus the training sequence length.

    ``num_layers`` counts encoder layers (enc-dec, BERT) or decoder layers (decoder-only);
    ``num_decoder_layers`` is used by encoder-decoder archs only. MoE: layer ``i`` of a stack has a sparse FFN
    iff ``num_experts > 0 and i % moe_every == moe_offset % moe_every``.
    """
    arch: str                             # transformer | bert | gpt | switch | glam
    vocab_size: int                       # V
    hidden_size: int                      # h
    num_layers: int                       # encoder layers (enc-dec, bert) or decoder layers (decoder-only)
    num_heads: int                        # a
    ffn_hidden_size: int                  # f (dense FFN width)
    seq_length: int                       # s, training sequence length (source = target length for enc-dec)
    num_decoder_layers: int = 0           # decoder layers of enc-dec archs (0 for the others)
    num_kv_heads: Optional[int] = None    # grouped-query attention; None = num_heads
    head_dim: Optional[int] = None        # None = hidden_size // num_heads
    gated_ffn: bool = False               # swiglu/geglu/reglu: 3 FFN matrices instead of 2
    tie_word_embeddings: bool = True      # LM head shares the input embedding
    position_embedding: str = "learned"   # learned | sinusoidal | rotary | relative | none
    max_position_embeddings: int = 0      # learned table rows; 0 = seq_length
    use_bias: bool = True                 # biases in attention / FFN projections
    norm: str = "layernorm"               # layernorm (scale + bias) or rmsnorm (scale)
    norm_bias: bool = True                # LayerNorm has a bias
    pre_norm: bool = True                 # pre-norm blocks (adds a final norm per stack when final_norm)
    final_norm: bool = True               # norm after the last pre-norm block of each stack
    type_vocab_size: int = 0              # BERT segment embeddings
    relative_num_buckets: int = 32        # T5 relative position buckets (one bias table per stack)
    num_experts: int = 0                  # experts per MoE layer; 0 = dense
    top_k: int = 1                        # experts per token
    moe_every: int = 1                    # MoE FFN in every n-th layer of a stack
    moe_offset: int = 0                   # layer i is MoE iff i % moe_every == moe_offset % moe_every
    expert_ffn_hidden_size: Optional[int] = None  # expert FFN width; None = ffn_hidden_size
    capacity_factor: float = 1.0          # training capacity factor: expert slots per routed token

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelShape.arch: '{self.arch}' is not one of {list(ARCHS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name}: must be > 0, got {getattr(self, name)}")
        if self.arch in ENCODER_DECODER and self.num_decoder_layers <= 0:
            raise ValueError(f"ModelShape.num_decoder_layers: arch '{self.arch}' is encoder-decoder and needs "
                             f"num_decoder_layers > 0, got {self.num_decoder_layers}")
        if self.arch not in ENCODER_DECODER and self.num_decoder_layers != 0:
            raise ValueError(f"ModelShape.num_decoder_layers: arch '{self.arch}' has one stack; "
                             f"got num_decoder_layers={self.num_decoder_layers} (use num_layers)")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"ModelShape.hidden_size: {self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"ModelShape.num_kv_heads: num_heads={self.num_heads} must be a positive multiple "
                             f"of num_kv_heads={self.num_kv_heads}")
        if self.norm not in NORMS:
            raise ValueError(f"ModelShape.norm: '{self.norm}' is not one of {list(NORMS)}")
        if self.position_embedding not in POSITIONS:
            raise ValueError(f"ModelShape.position_embedding: '{self.position_embedding}' is not one of "
                             f"{list(POSITIONS)}")
        if self.position_embedding == "learned" and self.max_position_embeddings and \
                self.seq_length > self.max_position_embeddings:
            raise ValueError(f"ModelShape.seq_length: {self.seq_length} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings} of the learned position table")
        if self.num_experts < 0:
            raise ValueError(f"ModelShape.num_experts: must be >= 0, got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"ModelShape.top_k: must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.top_k}")
            if self.moe_every < 1:
                raise ValueError(f"ModelShape.moe_every: must be >= 1, got {self.moe_every}")
            if self.capacity_factor <= 0:
                raise ValueError(f"ModelShape.capacity_factor: must be > 0, got {self.capacity_factor}")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def is_encoder_decoder(self) -> bool:
        return self.arch in ENCODER_DECODER

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_hidden_size or self.ffn_hidden_size

    @property
    def total_layers(self) -> int:
        """Layers a pipeline splits: encoder + decoder layers."""
        return self.num_layers + self.num_decoder_layers

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (0-based, within its stack) has a sparse FFN."""
        return self.num_experts > 0 and i % self.moe_every == self.moe_offset % self.moe_every

    def replace(self, **changes) -> "ModelShape":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"ModelShape.replace: unknown field(s) {sorted(unknown)}")
        values.update(changes)
        return ModelShape(**values)

    # ---- construction from a ModelConfig (duck typing) -----------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg, seq_length: int) -> "ModelShape":
        """Build a shape from any object with ``ModelConfig``'s attributes, at training length ``seq_length``."""
        for name in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            if not hasattr(model_cfg, name):
                raise ValueError(f"model config: missing attribute '{name}' (got {type(model_cfg).__name__})")
        if seq_length is None or int(seq_length) <= 0:
            raise ValueError(f"seq_length: must be > 0, got {seq_length}")
        arch = model_cfg.arch
        enc_dec = arch in ENCODER_DECODER
        dec = getattr(model_cfg, "num_decoder_layers", None)
        moe = getattr(model_cfg, "moe", None)
        num_experts = int(getattr(moe, "num_experts", 0) or 0) if moe is not None else 0
        activation = getattr(model_cfg, "activation", "gelu")
        max_pos = int(getattr(model_cfg, "max_position_embeddings", 0) or 0)
        return cls(
            arch=arch,
            vocab_size=int(model_cfg.vocab_size),
            hidden_size=int(model_cfg.hidden_size),
            num_layers=int(model_cfg.num_layers),
            num_heads=int(model_cfg.num_heads),
            ffn_hidden_size=int(model_cfg.ffn_hidden_size),
            seq_length=int(seq_length),
            num_decoder_layers=(int(dec) if dec is not None else int(model_cfg.num_layers)) if enc_dec else 0,
            num_kv_heads=getattr(model_cfg, "num_kv_heads", None),
            head_dim=getattr(model_cfg, "head_dim", None),
            gated_ffn=activation in GATED_ACTIVATIONS,
            tie_word_embeddings=bool(getattr(model_cfg, "tie_word_embeddings", True)),
            position_embedding=getattr(model_cfg, "position_embedding", "learned"),
            max_position_embeddings=max_pos,
            use_bias=bool(getattr(model_cfg, "use_bias", True)),
            norm=getattr(model_cfg, "norm", "layernorm"),
            norm_bias=bool(getattr(model_cfg, "norm_bias", True)),
            pre_norm=bool(getattr(model_cfg, "pre_norm", True)),
            final_norm=bool(getattr(model_cfg, "final_norm", True)),
            type_vocab_size=int(getattr(model_cfg, "type_vocab_size", 0) or 0),
            relative_num_buckets=int(getattr(model_cfg, "relative_num_buckets", 32) or 32),
            num_experts=num_experts,
            top_k=int(getattr(moe, "top_k", 1)) if num_experts else 1,
            moe_every=int(getattr(moe, "moe_every", 1)) if num_experts else 1,
            moe_offset=int(getattr(moe, "moe_offset", 0)) if num_experts else 0,
            expert_ffn_hidden_size=getattr(moe, "expert_ffn_hidden_size", None) if num_experts else None,
            capacity_factor=float(getattr(moe, "capacity_factor_train", 1.0)) if num_experts else 1.0,
        )


def as_shape(model, seq_length: Optional[int]) -> ModelShape:
    """A ModelShape from a shape (``seq_length`` may override it) or a model config."""
    if isinstance(model, ModelShape):
        if seq_length is not None and int(seq_length) != model.seq_length:
            return model.replace(seq_length=int(seq_length))
        return model
    if seq_length is None:
        raise ValueError("seq_length: required when planning from a model config")
    return ModelShape.from_config(model, seq_length)
