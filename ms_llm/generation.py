"""Text generation for decoder-only models with a static-shape KV cache (Hugging Face ``generate`` conventions).

Per layer the cache holds keys and values ``(B, nkv, L, hd)``; ``L`` is ``P + max_new_tokens`` rounded up to a
multiple of ``cache_multiple``, so that nearby lengths share graphs. The caches are non-trainable ``Parameter``s of a
:class:`KVCache` owned by the generation cells of one (batch, cache length) -- built on first use and kept in a small
per-model dict (:func:`_steps`), not registered in the model, so its parameters and checkpoints never include them.
They are written in place (as MindFormers' ``DecoderKVCache`` does), and two compiled graphs do the work:

* **decode step**: one token per sequence ``(B, 1)``: its keys/values are added into the (zeroed) cache slot
  ``t`` by one in-place ``IndexAdd`` per cache, then it attends over the cache. Nothing but the logits (B, V) and
  their argmax (B,) leaves the graph. Every step has the same input shapes, so it compiles once in GRAPH_MODE per
  (batch size, cache length) and is reused by later calls;
* **prefill** (``prefill='forward'``): one full forward over the (left-padded) prompt ``(B, P)`` that assigns every
  layer's keys/values to slots ``0..P-1`` of the caches (zeros after) and returns the last position's logits (one
  graph per prompt length). With ``prefill='step'`` the prompt instead goes token by token through the decode graph,
  so a single graph serves the whole generation; ``'auto'`` (default) steps through prompts of up to
  ``STEP_PREFILL_MAX`` tokens. Every call starts from zeroed caches (the prefill graph writes zeros after the prompt;
  a stepped prompt first runs a small zeroing graph), so each slot is written exactly once.

The new token's attention visibility is an explicit key mask over slots (built with numpy on the host): slot ``j`` is
visible iff it holds a real (non-padding) token and ``j <= t`` (dense layers), and additionally ``j > t - band_width``
in GPT-3's banded layers. With left padding the real tokens of a row occupy consecutive slots, so these are exactly
the causal and band rules of the full forward. Slots beyond ``t`` may hold stale keys/values of an earlier call: they
are masked out. Greedy decoding without processors or per-step outputs reads only the in-graph argmax.

The output head of both graphs (the decode step's projection and the prefill's last position) is chosen by
``head_impl``: 'matmul' is the model's own MatMul (the one training uses), 'gemv' the weight-streaming GEMV of
:mod:`ms_llm.kernels.gemv` (a C++ kernel on CPU, MatMul on Ascend), 'auto' (default) the GEMV on CPU for batches
up to ``GEMV_MAX_BATCH`` (8) and MatMul otherwise. At batch 1 the head (768 x 50257 for GPT-2) is memory bound
and MindSpore's CPU MatMul reads the weight at about half the bandwidth the GEMV reaches (bench/bench_gemv.py).
Both give the same logits up to float32 summation order. Each head has its own pair of graphs per
(batch, cache length); they share that shape's KV caches.

The decoder layers of the decode step are chosen by ``layer_impl``: 'composite' runs the model's own blocks
(``TransformerBlock.construct_decode``, ~30 MindSpore kernels per layer), 'fused' one C++ kernel per layer
(:mod:`ms_llm.kernels.decode_layer`: pre-norm LayerNorm blocks with a plain FFN, i.e. GPT-2 / GPT-3), 'auto'
(default) the fused layer on CPU for such float32 models up to batch ``FUSED_MAX_BATCH`` (8), else the blocks. The
fused kernel only reads the caches; its new keys/values are added into them by the same ``IndexAdd`` as the blocks'.

Conventions followed (Hugging Face transformers 5.x ``GenerationMixin``):

* batches of prompts are **left**-padded; ``attention_mask`` marks real tokens. Position ids are
  ``cumsum(attention_mask) - 1`` with padding at 0, and each new token's position is the previous one + 1
  (``_prepare_position_ids_for_generation`` / ``_update_model_kwargs_for_generation``);
* greedy (``do_sample=False``) takes the argmax of the raw logits; sampling applies, in this order, temperature,
  top-k (default 50, 0 = off) and top-p (nucleus; the smallest set whose probability reaches ``top_p``, at least one
  token) as ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper`` do;
* ``eos_token_id`` (an id or a list of stop ids) finishes a sequence; finished sequences are continued with
  ``pad_token_id``; generation ends when all are finished or after ``max_new_tokens``. ``min_new_tokens`` masks the
  stop ids until that many tokens were generated;
* the result is ``(B, P + generated)`` token ids (prompt included), as a numpy int64 array, or with
  ``return_dict_in_generate=True`` a :class:`~ms_llm.models.outputs.ModelOutput` with ``sequences`` and optional
  per-step ``scores`` (processed) and ``logits`` (raw), each a tuple of ``(B, V)`` float32 arrays.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .kernels.decode_layer import make_decode_layer, select_layer_impl
from .kernels.gemv import make_gemv, select_head_impl
from .models.outputs import ModelOutput

_FROM_CONFIG = object()   # default of eos_token_id: the model config's eos id
# prefill='auto': prompts up to this length go token by token through the decode graph. Measured (GPT 2 x 768,
# vocab 50257, fp32, 2 threads, bench/results/gen_kvcache.md): a 32-token prompt costs 0.65 s (B=1) / 1.1 s (B=8)
# stepped, 0.03 s / 0.1 s through the prefill graph, whose compilation costs ~1.8 s once per prompt length; 16 steps
# (~0.3 s) stay below that one-off cost, longer prompts are cheaper through the prefill graph from the second call on.
STEP_PREFILL_MAX = 16


MAX_CACHED_SHAPES = 4     # (batch, cache length) decoders kept per model (each holds its KV caches)


class KVCache:
    """Per-layer key and value caches ``(B, nkv, L, hd)`` as non-trainable Parameters (zeros at first).

    Shared by the prefill and decode cells of one (batch, cache length), never owned by the model: the caches are
    not among the model's ``parameters_and_names()`` / ``trainable_params()`` and never reach its checkpoints.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, cache_len: int, head_dim: int, dtype=ms.float32):
        shape = (batch, kv_heads, cache_len, head_dim)
        zeros = np.zeros(shape, ms.dtype_to_nptype(dtype))
        tag = f"kv_cache_{batch}x{cache_len}"
        self.keys = ms.ParameterTuple(
            ms.Parameter(Tensor(zeros), name=f"{tag}.key.{i}", requires_grad=False) for i in range(num_layers))
        self.values = ms.ParameterTuple(
            ms.Parameter(Tensor(zeros), name=f"{tag}.value.{i}", requires_grad=False) for i in range(num_layers))
        self.shape = shape
        self._zero = None

    def zero(self):
        """Set every cache to zeros (one small graph for all of them, compiled on first use)."""
        if self._zero is None:
            self._zero = _ZeroCaches(self)
        self._zero()


class _ZeroCaches(nn.Cell):
    """Assigns zeros to every key and value cache of one :class:`KVCache`."""

    def __init__(self, cache: KVCache):
        super().__init__(auto_prefix=False)
        self.caches = ms.ParameterTuple(tuple(cache.keys) + tuple(cache.values))
        self.phase = "increment"                 # fixed (no) inputs: MindSpore's fast call path, see _DecodeStep

    def construct(self):
        done = ops.zeros((), ms.int32)
        for c in self.caches:
            done = ops.depend(done, ops.assign(c, ops.zeros_like(c)))
        return done


class _Prefill(nn.Cell):
    """Prompt forward (B, P): writes every layer's keys/values into cache slots 0..P-1 (the rest zeroed) and
    returns the last position's logits (B, V). One graph per prompt length."""

    def __init__(self, model, cache: KVCache, head=None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.k_caches = cache.keys
        self.v_caches = cache.values
        self.num_layers = len(cache.keys)
        self.head = head                     # None: the model's own projection; else an x @ w^T cell (kernels/gemv)

    def construct(self, input_ids, attention_mask, position_ids):
        logits, ks, vs = self.model.construct_prefill(input_ids, attention_mask, position_ids, self.head)
        for i in range(self.num_layers):
            k = ks[i]
            b, nkv, p, hd = k.shape
            pad = ops.zeros((b, nkv, self.k_caches[i].shape[2] - p, hd), self.k_caches[i].dtype)   # (B, nkv, L-P, hd)
            logits = ops.depend(logits, ops.assign(
                self.k_caches[i], ops.concat((ops.cast(k, pad.dtype), pad), 2)))                  # (B, nkv, L, hd)
            logits = ops.depend(logits, ops.assign(
                self.v_caches[i], ops.concat((ops.cast(vs[i], pad.dtype), pad), 2)))              # (B, nkv, L, hd)
        return logits


class _DecodeStep(nn.Cell):
    """One token per sequence (B, 1) against the caches, written in place: (logits (B, V), greedy ids (B,)).
    The new keys/values are added into cache slot ``slot``, which must hold zeros (Attention.construct_decode)."""

    def __init__(self, model, cache: KVCache, head=None, layer=None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.k_caches = cache.keys
        self.v_caches = cache.values
        self.head = head                     # None: the model's own projection; else an x @ w^T cell (kernels/gemv)
        self.layer = layer                   # None: the model's blocks; else a fused layer (kernels/decode_layer)
        self.argmax = ops.Argmax(axis=-1, output_type=ms.int32)
        # MindSpore's incremental-inference fast path (``Cell._predict``, as MindFormers' decoders use it): once the
        # 'increment' phase is compiled, a call goes straight to the graph executor, skipping the per-call argument
        # key and the phase walk over every sub-cell (~0.6 ms of a ~13 ms batch-1 step, measured). Safe here because
        # every call of this cell has the same input shapes and dtypes (one cell per batch and cache length).
        self.phase = "increment"

    def construct(self, input_ids, position_ids, dense_mask, band_mask, slot):
        logits = self.model.construct_decode(input_ids, position_ids, dense_mask, band_mask, slot,
                                             self.k_caches, self.v_caches, self.head, self.layer)   # (B, V)
        return logits, self.argmax(logits)                                   # (B, V), (B,)


class _ShapeCells:
    """The generation cells of one (batch, cache length), all sharing one :class:`KVCache`: ``prefill`` maps an
    output-head implementation ('matmul' / 'gemv') to its :class:`_Prefill`, ``decode`` maps a (head, layer)
    implementation pair (layer: 'composite' / 'fused') to its :class:`_DecodeStep`."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.prefill = {}
        self.decode = {}
        self.heads = {}

    def cells(self, model, head_impl: str, layer_impl: str):
        """``(prefill, decode)`` for these implementations, built on first use."""
        if head_impl not in self.heads:
            self.heads[head_impl] = None if head_impl == "matmul" else make_gemv(head_impl)
        head = self.heads[head_impl]
        if head_impl not in self.prefill:
            self.prefill[head_impl] = _Prefill(model, self.cache, head)
        if (head_impl, layer_impl) not in self.decode:
            layer = None
            if layer_impl != "composite":
                cfg = model.cfg
                layer = make_decode_layer(layer_impl, cfg.num_heads, cfg.norm_eps,
                                          model.decoder.blocks[0].self_attn.scale, cfg.activation)
            self.decode[(head_impl, layer_impl)] = _DecodeStep(model, self.cache, head, layer)
        return self.prefill[head_impl], self.decode[(head_impl, layer_impl)]


def _steps(model, batch: int, cache_len: int) -> _ShapeCells:
    """The generation cells of ``model`` for one (batch, cache length) (:class:`_ShapeCells`, one KV cache each).

    Kept, outside the Cell tree (not sub-cells, so the caches are not model parameters), in a small per-model dict
    keyed by (batch, cache length), least recently used first out beyond ``MAX_CACHED_SHAPES`` entries. Each cell
    compiles once; later ``generate`` calls with the same shape and implementations reuse its graph.
    """
    table = model.__dict__.get("_ms_llm_generation_steps")
    if table is None:
        table = {}
        object.__setattr__(model, "_ms_llm_generation_steps", table)
    key = (int(batch), int(cache_len))
    steps = table.pop(key, None)
    if steps is None:
        cfg = model.cfg
        steps = _ShapeCells(KVCache(cfg.num_layers, batch, cfg.kv_heads, cache_len, cfg.dim_per_head))
        while len(table) >= MAX_CACHED_SHAPES:
            table.pop(next(iter(table)))
    table[key] = steps                                                       # most recently used last
    return steps


def _as_numpy_ids(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.asnumpy()
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be (batch, length) with length >= 1, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def top_k_filter(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Hugging Face TopKLogitsWarper: scores below the k-th largest become -inf (ties with it are kept)."""
    k = min(top_k, scores.shape[-1])
    kth = np.sort(scores, axis=-1)[:, -k][:, None]                          # (B, 1)
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Hugging Face TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - top_p."""
    order = np.argsort(scores, axis=-1, kind="stable")                      # (B, V) ascending
    sorted_scores = np.take_along_axis(scores, order, -1)                   # (B, V)
    cum = np.cumsum(_softmax(sorted_scores), axis=-1)                       # (B, V)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[:, -1] = False                                            # keep at least one token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, -np.inf, scores)


def process_scores(raw: np.ndarray, suppress: Optional[np.ndarray], do_sample: bool, temperature: float,
                   top_k: Optional[int], top_p: float) -> np.ndarray:
    """Hugging Face's logits processors in order: min-new-tokens (``suppress`` ids -> -inf), then, when sampling,
    temperature, top-k, top-p. ``raw`` (B, V) is not modified."""
    scores = raw.copy()
    if suppress is not None and suppress.size:
        scores[:, suppress] = -np.inf
    if do_sample:
        if temperature != 1.0:
            scores = scores / np.float32(temperature)
        if top_k:
            scores = top_k_filter(scores, int(top_k))
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
    return scores


def sample_tokens(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from softmax(scores) (B, V) by inverse-CDF sampling with ``rng``."""
    probs = _softmax(scores)                                                  # (B, V)
    b = probs.shape[0]
    u = rng.random((b, 1))
    nxt = np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[-1] - 1)   # first index with cdf >= u
    return np.where(probs[np.arange(b), nxt] > 0, nxt, probs.argmax(-1))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


def _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, min_new_tokens):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _stop_ids(eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        return np.zeros((0,), np.int64)
    if isinstance(eos_token_id, (int, np.integer)):
        return np.array([int(eos_token_id)], np.int64)
    return np.array([int(i) for i in eos_token_id], np.int64)


def generate(model, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = 50, top_p: float = 1.0,
             eos_token_id: Union[int, Sequence[int], None] = _FROM_CONFIG, pad_token_id: Optional[int] = None,
             min_new_tokens: int = 0, seed: Optional[int] = None, cache_multiple: int = 64,
             return_dict_in_generate: bool = False, output_scores: bool = False, output_logits: bool = False,
             streamer=None, prefill: str = "auto", head_impl: str = "auto", layer_impl: str = "auto"):
    """Generate continuations of ``input_ids`` (B, P) with a static KV cache; see the module docstring.

    ``eos_token_id`` defaults to ``model.cfg.eos_token_id`` (pass ``None`` for no stop token), ``pad_token_id`` to
    ``model.cfg.pad_token_id``. ``seed`` seeds the sampler (numpy). ``streamer`` is any object with ``put(ids)`` and
    ``end()`` (Hugging Face's streamer interface): it receives the prompt, then each step's new tokens (B,).
    ``prefill``: 'forward' (one graph over the prompt), 'step' (the prompt through the decode graph) or 'auto'.
    ``head_impl``: the output projection of the generation graphs, 'matmul', 'gemv' or 'auto' (the GEMV on CPU for
    batches up to 8, else MatMul; see the module docstring and :func:`ms_llm.kernels.gemv.select_head_impl`).
    ``layer_impl``: the decoder layers of the decode step, 'composite' (the model's blocks), 'fused' (one C++ kernel
    per layer, :mod:`ms_llm.kernels.decode_layer`) or 'auto' (fused on CPU for GPT-2/GPT-3-style float32 models up
    to batch 8; see :func:`ms_llm.kernels.decode_layer.select_layer_impl`).
    """
    cfg = model.cfg
    ids = _as_numpy_ids(input_ids, "input_ids")                               # (B, P)
    b, p = ids.shape
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = np.asarray(attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else attention_mask)
        mask = mask[None, :] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.astype(np.int64)
    if (mask.sum(1) == 0).any():
        raise ValueError("every prompt needs at least one real token (a row of attention_mask is all 0)")
    if (mask[:, -1] == 0).any():
        warnings.warn("a prompt is right-padded (attention_mask[:, -1] == 0); decoder-only generation needs left "
                      "padding, as in Hugging Face", stacklevel=2)
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids must be in [0, {cfg.vocab_size}), got range [{ids.min()}, {ids.max()}]")
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p, min_new_tokens)
    stop = _stop_ids(cfg.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id)
    pad = cfg.pad_token_id if pad_token_id is None else int(pad_token_id)

    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 0).astype(np.int64)   # (B, P), HF's rule
    max_position = int(positions[:, -1].max()) + max_new_tokens - 1
    if cfg.position_embedding in ("learned", "sinusoidal", "rotary") and max_position >= cfg.max_position_embeddings:
        raise ValueError(f"prompt ({p} tokens) + max_new_tokens={max_new_tokens} reaches position {max_position}, "
                         f"beyond model.max_position_embeddings={cfg.max_position_embeddings}")
    if cache_multiple < 1:
        raise ValueError(f"cache_multiple must be >= 1, got {cache_multiple}")
    cache_len = -(-(p + max_new_tokens) // cache_multiple) * cache_multiple   # L > P: room for every new token
    rng = np.random.default_rng(seed)

    if prefill not in ("auto", "step", "forward"):
        raise ValueError(f"prefill must be 'auto', 'step' or 'forward', got {prefill!r}")
    if prefill == "auto":
        prefill = "step" if p <= STEP_PREFILL_MAX else "forward"
    head_impl = select_head_impl(head_impl, b)                                # ValueError on an unknown name
    layer_impl = select_layer_impl(layer_impl, cfg, b)                        # ValueError: unknown or unsupported

    was_training = model.training
    model.set_train(False)
    steps = _steps(model, b, cache_len)
    prefill_cell, step_cell = steps.cells(model, head_impl, layer_impl)
    cache = steps.cache
    slots = np.arange(cache_len)
    band = cfg.band_width if cfg.attention_pattern == "alternating_banded" else 0
    valid = np.zeros((b, cache_len), np.float32)                              # slots holding real tokens

    def step(tokens, pos, slot):
        """Write ``tokens`` (B,) at cache slot ``slot``: (logits (B, V), greedy ids (B,)) as Tensors."""
        dense = valid * (slots <= slot)                                       # (B, L)
        banded = dense * (slots > slot - band) if band else dense             # (B, L)
        return step_cell(Tensor(tokens[:, None].astype(np.int32)), Tensor(pos.astype(np.int32)),
                         Tensor(dense), Tensor(banded.astype(np.float32)), Tensor(np.array([slot], np.int32)))

    # greedy without processors or per-step outputs needs only the in-graph argmax, not the (B, V) logits
    ids_only = not do_sample and not output_scores and not output_logits and min_new_tokens == 0
    try:
        if streamer is not None:
            streamer.put(ids)
        if prefill == "forward":
            logits = prefill_cell(Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.float32)),
                                  Tensor(positions.astype(np.int32)))
            greedy = None
            valid[:, :p] = mask
        else:   # the prompt token by token through the decode graph: one compiled graph serves everything
            cache.zero()                                                      # slots are added into (IndexAdd)
            for j in range(p):
                valid[:, j] = mask[:, j]
                logits, greedy = step(ids[:, j], positions[:, j:j + 1], j)
        unfinished = np.ones(b, bool)
        out_ids = [ids]
        all_scores, all_logits = [], []
        pos = positions[:, -1:].copy()                                        # (B, 1)
        for t in range(max_new_tokens):
            if ids_only and greedy is not None:
                nxt = greedy.asnumpy().astype(np.int64)                       # (B,) argmax of the raw logits
            else:
                raw = logits.asnumpy().astype(np.float32)                     # (B, V)
                scores = process_scores(raw, stop if t < min_new_tokens else None, do_sample, temperature, top_k,
                                        top_p)
                nxt = sample_tokens(scores, rng) if do_sample else scores.argmax(-1)
            if output_scores:
                all_scores.append(scores.astype(np.float32))
            if output_logits:
                all_logits.append(raw)
            nxt = np.where(unfinished, nxt, pad).astype(np.int64)             # (B,)
            out_ids.append(nxt[:, None])
            if streamer is not None:
                streamer.put(nxt)
            if stop.size:
                unfinished &= ~np.isin(nxt, stop)
            if not unfinished.any() or t == max_new_tokens - 1:
                break
            slot = p + t                                                      # cache slot of the new token
            valid[:, slot] = 1.0
            pos = pos + 1
            logits, greedy = step(nxt, pos, slot)
    finally:
        model.set_train(was_training)
        if streamer is not None:
            streamer.end()
    sequences = np.concatenate(out_ids, axis=1)                               # (B, P + generated)
    if not return_dict_in_generate:
        return sequences
    out = ModelOutput(sequences=sequences)
    if output_scores:
        out["scores"] = tuple(all_scores)
    if output_logits:
        out["logits"] = tuple(all_logits)
    return out


class ProgressStreamer:
    """A streamer (``put`` / ``end``) showing a tqdm bar over new tokens with tokens/s; keeps the ids it saw.

    ``first_token_s`` is the time to the first new token (graph compilation and the prompt included);
    ``tokens_per_second`` counts the later tokens of all sequences over the time after the first one.
    """

    def __init__(self, total: int, desc: str = "generating", disable: bool = False):
        self.total, self.desc, self.disable = total, desc, disable
        self.bar = None
        self.prompt = None
        self.new_tokens = []
        self.start = self.first = self.last = None

    def put(self, ids):
        ids = np.asarray(ids)
        now = time.perf_counter()
        if self.prompt is None:
            from tqdm import tqdm
            self.prompt = ids
            self.bar = tqdm(total=self.total, desc=self.desc, unit="tok", disable=self.disable, leave=False)
            self.start = now
            return
        self.new_tokens.append(ids)
        if self.first is None:
            self.first = now
        self.last = now
        self.bar.update(1)
        if len(self.new_tokens) > 1:
            self.bar.set_postfix_str(f"{self.tokens_per_second:.1f} tok/s")

    def end(self):
        if self.bar is not None:
            self.bar.close()

    @property
    def first_token_s(self) -> float:
        return (self.first - self.start) if self.first is not None else 0.0

    @property
    def tokens_per_second(self) -> float:
        n = (len(self.new_tokens) - 1) * (self.prompt.shape[0] if self.prompt is not None else 0)
        dt = (self.last - self.first) if self.first is not None else 0.0
        return n / dt if n > 0 and dt > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# `ms-llm generate`
# ----------------------------------------------------------------------------------------------------------------
def _find_tokenizer(directory: str):
    from .data.bpe import BPETokenizer
    if os.path.exists(os.path.join(directory, "tokenizer.json")) or (
            os.path.exists(os.path.join(directory, "vocab.json")) and
            os.path.exists(os.path.join(directory, "merges.txt"))):
        return BPETokenizer.load(directory)
    return None


def load_causal_lm(checkpoint_dir: str, tokenizer: Optional[str] = None):
    """``(model, tokenizer)`` from a Hugging Face GPT-2 / Llama directory (``config.json`` + ``model.safetensors``)
    or an ms_llm trainer output directory (``config.yaml`` + ``checkpoints/``). The tokenizer is ``tokenizer`` (a
    path) if given, else the one saved in the directory (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, or
    ``tokenizer/`` of a training run), else the training config's ``data.tokenizer``, else, for a GPT-2-sized
    vocabulary, the GPT-2 tokenizer shipped in ``ms_llm/data/assets/gpt2``."""
    from .data.bpe import BPETokenizer
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
    hf_cfg = os.path.join(checkpoint_dir, "config.json")
    run_cfg = os.path.join(checkpoint_dir, "config.yaml")
    tok = BPETokenizer.load(tokenizer) if tokenizer else None
    if os.path.exists(hf_cfg):
        import json
        with open(hf_cfg) as f:
            model_type = json.load(f).get("model_type")
        if model_type == "gpt2":
            from .checkpoint.hf_gpt2 import from_pretrained
        elif model_type == "llama":
            from .checkpoint.hf_llama import from_pretrained
        else:
            raise ValueError(f"{hf_cfg}: model_type '{model_type}' is not a decoder ms_llm generates with "
                             f"(gpt2, llama)")
        model = from_pretrained(checkpoint_dir)
        tok = tok or _find_tokenizer(checkpoint_dir)
    elif os.path.exists(run_cfg):
        from .config import load_config
        from .models import build_model
        from .training import checkpointing
        cfg = load_config(run_cfg)
        meta = checkpointing.latest(checkpoint_dir)
        if meta is None:
            raise FileNotFoundError(f"{checkpoint_dir}: a training run directory without checkpoints")
        model = build_model(cfg.model)
        if not hasattr(model, "construct_decode"):
            raise ValueError(f"{run_cfg}: model.arch '{cfg.model.arch}' is not a decoder-only language model")
        checkpointing.load_model(meta, model)
        model.set_train(False)
        tok = tok or _find_tokenizer(os.path.join(checkpoint_dir, "tokenizer"))
        if tok is None and cfg.data.tokenizer:
            tok = BPETokenizer.load(cfg.data.tokenizer)
    else:
        raise FileNotFoundError(f"{checkpoint_dir}: neither a Hugging Face directory (config.json) nor an ms_llm "
                                f"training run (config.yaml)")
    if tok is None and model.cfg.vocab_size == 50257:
        tok = BPETokenizer.gpt2()
    if tok is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no tokenizer found; pass one (a tokenizer.json or a folder with "
                                f"vocab.json + merges.txt)")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}")
    return model, tok


def generate_cli(checkpoint_dir: str, prompt: str, max_new_tokens: int = 50, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, seed: Optional[int] = None,
                 tokenizer: Optional[str] = None, progress: bool = True, print_fn=print) -> dict:
    """``ms-llm generate --checkpoint DIR --prompt "..."``: load (see :func:`load_causal_lm`), generate with a
    progress bar, print the text and a speed line. Returns ``{text, new_tokens, first_token_s, tokens_per_s}``."""
    model, tok = load_causal_lm(checkpoint_dir, tokenizer)
    ids = tok.encode(prompt) if prompt else [model.cfg.bos_token_id]
    if not ids:
        ids = [model.cfg.bos_token_id]
    if model.cfg.position_embedding != "none" and len(ids) + max_new_tokens > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{model.cfg.max_position_embeddings} positions")
    streamer = ProgressStreamer(max_new_tokens, disable=not progress)
    out = generate(model, np.array([ids]), max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, streamer=streamer)
    new = out[0, len(ids):]
    text = tok.decode(out[0])
    stats = {"text": text, "new_tokens": int(len(new)), "first_token_s": streamer.first_token_s,
             "tokens_per_s": streamer.tokens_per_second}
    print_fn(text)
    print_fn(f"[{stats['new_tokens']} new tokens; first after {stats['first_token_s']:.2f} s (graph compilation and "
             f"prompt included), then {stats['tokens_per_s']:.1f} tokens/s]")
    return stats
