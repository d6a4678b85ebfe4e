"""MoE routers: top-k (Switch top-1, GShard top-2), noisy top-k (Shazeer et al. 2017), expert choice (Zhou et al. 2022).

Every router maps hidden states ``(G, T, H)`` (G routing groups, e.g. sequences, of T tokens) to a
:data:`ROUTER_FIELDS` tuple. Logits and softmax are float32 whatever the compute dtype ("selective precision",
Fedus et al. 2021). Routing results are expressed per expert slot, the one format the dispatcher needs:

- ``slot_token (G, E, C) int32``: index (inside its group) of the token occupying each of the C slots of expert E;
- ``slot_weight (G, E, C) float32``: the combine weight of that slot (0 for an empty slot).

MindSpore 2.10 graphs cannot return namedtuples (a namedtuple built inside ``construct`` becomes an interpreted
PyExecute node that stops gradients), so routers return plain tuples indexed by the constants below; a top-level
Python call returns a :class:`~ms_llm.models.outputs.ModelOutput` with the same names.

Expert capacity is ``ceil(tokens * top_k * capacity_factor / experts)`` per group (or ``moe.expert_capacity``),
with the training or evaluation factor chosen by ``cell.training`` (``set_train``); tokens beyond an expert's
capacity are dropped (their MoE output is 0, so only the residual carries them).
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..layers.linear import Linear
from ..models.outputs import NamedOutputs
from .losses import importance_loss, load_loss, router_z_loss, smooth_load, switch_load_balance

ROUTER_FIELDS = ("slot_token", "slot_weight", "probs", "logits", "aux_loss", "losses", "load", "dropped")
"""Names of the router result: slots (see module doc), probs/logits (G, T, E) float32, aux_loss () weighted sum of
the auxiliary losses, losses (4,) the unweighted :data:`LOSS_NAMES`, load (E,) fraction of routing requests per
expert (before capacity), dropped () fraction of requests dropped by capacity (expert choice: tokens no expert
took)."""
SLOT_TOKEN, SLOT_WEIGHT, PROBS, LOGITS, AUX_LOSS, LOSSES, LOAD, DROPPED = range(len(ROUTER_FIELDS))
LOSS_NAMES = ("load_balance", "z_loss", "importance", "load")


def expert_capacity(tokens: int, top_k: int, capacity_factor: float, num_experts: int, min_capacity: int = 1,
                    fixed: int = 0) -> int:
    """Slots per expert for a group of ``tokens``: ``ceil(tokens * top_k * factor / experts)`` (or ``fixed``).

    Floored at ``min_capacity`` and capped at ``tokens``: no expert can receive more tokens than the group has
    (a token picks an expert at most once), so a larger buffer would only hold empty slots.
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is greater than the number of experts ({num_experts})")
    if tokens < 1:
        raise ValueError(f"a routing group needs at least one token, got {tokens}")
    if fixed:
        cap = fixed
    else:
        # round() first so that e.g. 16 * 1 * 1.25 / 4 = 5.000000000000001 is not ceil'ed to 6
        cap = max(min_capacity, math.ceil(round(tokens * top_k * capacity_factor / num_experts, 9)))
    return min(cap, tokens)


def assign_positions(expert_index, num_experts: int, capacity: int, choice_mask=None):
    """Slot of every (token, choice) inside its expert, GShard order: all first choices (in token order), then all
    second choices, ...; a choice is kept iff its slot < capacity (and ``choice_mask`` is 1).

    expert_index (G, T, k) int32; choice_mask optional (G, T, k) float 1/0 (0 = choice not requested).
    Returns position (G, T, k) int32 and kept (G, T, k) float32 1/0 (no gradient flows through either).
    """
    g, t, k = expert_index.shape
    onehot = ops.one_hot(expert_index, num_experts, 1.0, 0.0)                # (G, T, k, E)
    if choice_mask is not None:
        onehot = onehot * ops.expand_dims(choice_mask, -1)                    # (G, T, k, E)
    order = ops.transpose(onehot, (0, 2, 1, 3))                               # (G, k, T, E)
    flat = ops.reshape(order, (g, k * t, num_experts))                        # (G, k*T, E)
    before = ops.cumsum(flat, 1) - flat                                       # (G, k*T, E) earlier requests
    pos = ops.sum(before * flat, -1)                                          # (G, k*T)
    pos = ops.transpose(ops.reshape(pos, (g, k, t)), (0, 2, 1))               # (G, T, k)
    requested = ops.sum(onehot, -1)                                           # (G, T, k) 1/0
    kept = ops.cast(pos < capacity, ms.float32) * requested                   # (G, T, k)
    return ops.stop_gradient(ops.cast(pos, ms.int32)), ops.stop_gradient(kept)


def route_topk_grouped(probs, k: int, capacity: int):
    """:func:`route_topk` for a leading group axis: probs (G, T, E) -> four (G, T, k) tensors."""
    num_experts = probs.shape[-1]
    if k > num_experts:
        raise ValueError(f"route_topk: k={k} is greater than the number of experts ({num_experts})")
    if capacity < 1:
        raise ValueError(f"route_topk: capacity must be >= 1, got {capacity}")
    gates, expert_index = ops.topk(probs, k)                                  # (G, T, k) float32, int32
    position, kept = assign_positions(expert_index, num_experts, capacity)   # (G, T, k) int32, float32
    return expert_index, gates * kept, position, kept


def route_topk(probs, k: int, capacity: int):
    """Token-choice top-k routing with capacity (the composite a fused kernel mirrors).

    probs (T, E) float32 -> expert_index (T, k) int32 (descending probability), combine_weight (T, k) float32
    (the chosen probability, 0 where dropped), position (T, k) int32 (slot inside the expert, in token order,
    first choices before second choices as in GShard), kept (T, k) float32 1/0.
    """
    if probs.ndim != 2:
        raise ValueError(f"route_topk expects probs of shape (T, E), got {probs.shape}")
    outs = route_topk_grouped(ops.expand_dims(probs, 0), k, capacity)        # 4 x (1, T, k)
    return tuple(o[0] for o in outs)                                          # 4 x (T, k)


def choices_to_slots(expert_index, position, kept, combine_weight, num_experts: int, capacity: int):
    """Token-side choices (G, T, k) -> expert slots: slot_token (G, E, C) int32, slot_weight (G, E, C) float32.

    Dropped choices are scattered to a trash column C that is sliced away; empty slots hold token 0 with weight 0.
    """
    g, t, k = expert_index.shape
    width = capacity + 1
    column = ops.select(kept > 0, position, ops.full_like(position, capacity))   # (G, T, k)
    flat = expert_index * width + column                                          # (G, T, k) slot id in (E, C+1)
    group = ops.broadcast_to(ops.reshape(ops.arange(g, dtype=ms.int32), (g, 1, 1)), (g, t, k))   # (G, T, k)
    token = ops.broadcast_to(ops.reshape(ops.arange(t, dtype=ms.int32), (1, t, 1)), (g, t, k))   # (G, T, k)
    indices = ops.reshape(ops.stack((group, flat), -1), (g * t * k, 2))           # (G*T*k, 2)
    shape = (g, num_experts * width)
    slot_token = ops.scatter_nd(indices, ops.reshape(token, (-1,)), shape)        # (G, E*(C+1))
    slot_weight = ops.scatter_nd(indices, ops.reshape(combine_weight, (-1,)), shape)  # (G, E*(C+1))
    slot_token = ops.reshape(slot_token, (g, num_experts, width))[:, :, :capacity]    # (G, E, C)
    slot_weight = ops.reshape(slot_weight, (g, num_experts, width))[:, :, :capacity]  # (G, E, C)
    return ops.stop_gradient(slot_token), slot_weight


class StandardNormal(nn.Cell):
    """Noise source of the noisy top-k router: ``construct(shape)`` -> N(0, 1) samples (a cell, so tests can
    substitute fixed noise and transcribe the equations exactly)."""

    def __init__(self):
        super().__init__()
        self.normal = ops.StandardNormal()

    def construct(self, shape):
        return self.normal(shape)


class Router(NamedOutputs, nn.Cell):
    """Shared parts: float32 gate projection W_g, capacity from the config, loss weighting."""

    output_names = ROUTER_FIELDS

    def __init__(self, cfg):
        super().__init__()
        m = cfg.moe
        if m.num_experts < 1:
            raise ValueError(f"model.moe.num_experts must be >= 1 for a router, got {m.num_experts}")
        if m.top_k > m.num_experts:
            raise ValueError(f"model.moe.top_k={m.top_k} is greater than model.moe.num_experts={m.num_experts}")
        self.num_experts = m.num_experts
        self.k = m.top_k
        self.capacity_factor_train = m.capacity_factor_train
        self.capacity_factor_eval = m.capacity_factor_eval
        self.min_capacity = m.min_capacity
        self.fixed_capacity = m.expert_capacity
        # router weight (E, H), float32 regardless of compute dtype; never sharded (every device routes its tokens)
        self.gate = Linear(cfg.hidden_size, m.num_experts, "embed", None, has_bias=m.router_bias,
                           init_std=cfg.initializer_range, compute_dtype="float32")
        self.coefs = Tensor(np.array([m.load_balance_coef, m.z_loss_coef, m.importance_coef, m.load_coef],
                                     np.float32))
        self.cast = ops.Cast()

    def capacity(self, tokens: int) -> int:
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        return expert_capacity(tokens, self.k, factor, self.num_experts, self.min_capacity, self.fixed_capacity)

    def weighted(self, lb, z, importance, load):
        """(aux_loss, losses (4,)) from the four unweighted losses."""
        losses = ops.stack((lb, z, importance, load))                         # (4,)
        return ops.sum(losses * self.coefs), losses

    def token_choice_outputs(self, probs, logits, gates, expert_index, position, kept, combine, load, capacity,
                             requested, slots=None):
        """Everything a token-choice router returns.

        gates (G, T, E): the dense gate values G(x) (importance loss); load: the unweighted load loss;
        requested (G, T, k) 1/0: which choices asked for a slot (all of them unless GShard sampling dropped one);
        slots: (slot_token, slot_weight) when already computed (fused routing), else built from the choices.
        """
        if slots is None:
            slot_token, slot_weight = choices_to_slots(expert_index, position, kept, combine, self.num_experts,
                                                       capacity)                 # (G, E, C) x 2
        else:
            slot_token, slot_weight = slots
        aux, losses = self.weighted(switch_load_balance(probs, expert_index[:, :, 0]), router_z_loss(logits),
                                    importance_loss(gates), load)
        requests = ops.one_hot(expert_index, self.num_experts, 1.0, 0.0) * ops.expand_dims(requested, -1)
        per_expert = ops.reshape(requests, (-1, self.num_experts)).sum(0)         # (E,)
        total = ops.sum(per_expert)
        dropped = 1.0 - ops.sum(kept) / total
        return (slot_token, slot_weight, probs, logits, aux, losses, ops.stop_gradient(per_expert / total),
                ops.stop_gradient(dropped))


class TopKRouter(Router):
    """Switch (top-1, Fedus et al. 2021) and GShard/GLaM (top-2, Lepikhin et al. 2020) token-choice routing.

    probs = softmax(x W_r) in float32 (x multiplied by U(1-eps, 1+eps) jitter while training if
    ``moe.jitter_eps``); each token takes its top-k experts; with k > 1 and ``moe.normalize_top_k`` the k gates are
    divided by their sum (before capacity drops, as GShard). ``second_expert_policy='sampling'`` (GShard, training
    only) keeps the second choice with probability min(1, 2 * g2), g2 its normalised gate.

    Top-k, capacity positions and slots come from the routing cell named by ``moe.router_impl``
    (:func:`ms_llm.kernels.moe_routing.make_moe_routing`): 'reference' is the composite ops of this module, 'fused'
    one C++ pass on CPU (built-in MoE ops on Ascend), 'auto' (default) fused on CPU and reference elsewhere; outputs
    and gradients are identical (up to the order of tied probabilities). The sampling policy keeps
    the composite while training (its random second-choice mask is not part of the routing cells).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.moe
        if m.second_expert_policy == "sampling" and m.top_k != 2:
            raise ValueError(f"model.moe.second_expert_policy='sampling' needs top_k=2, got {m.top_k}")
        self.jitter_eps = m.jitter_eps
        self.normalize = m.normalize_top_k and m.top_k > 1
        self.sampling = m.second_expert_policy == "sampling"
        self.uniform = ops.UniformReal()
        from ..kernels.moe_routing import make_moe_routing   # not at the top: that module imports this one
        self.routing = make_moe_routing(m.router_impl, m.num_experts, m.top_k, self.normalize)

    def gate_stats(self, expert_index, chosen, requested):
        """Dense gates G(x) (G, T, E) for the importance loss and the unweighted load loss from the choices."""
        onehot = ops.one_hot(expert_index, self.num_experts, 1.0, 0.0)            # (G, T, k, E)
        gates_dense = ops.sum(onehot * ops.expand_dims(chosen * requested, -1), 2)    # (G, T, E)
        load = load_loss(ops.sum(onehot * ops.expand_dims(requested, -1), 2))      # counts, no gradient
        return gates_dense, load

    def construct(self, x):
        """x (G, T, H) -> ROUTER_FIELDS tuple."""
        x = self.cast(x, ms.float32)
        if self.training and self.jitter_eps > 0:
            x = x * (1.0 - self.jitter_eps + 2.0 * self.jitter_eps * self.uniform(x.shape))   # (G, T, H)
        logits = self.gate(x)                                                      # (G, T, E)
        probs = ops.softmax(logits, -1)                                            # (G, T, E)
        capacity = self.capacity(x.shape[1])
        if not (self.sampling and self.training):
            expert_index, chosen, position, kept, slot_token, slot_weight = self.routing(probs, capacity)
            requested = ops.ones_like(kept)                                        # (G, T, k)
            gates_dense, load = self.gate_stats(expert_index, chosen, requested)
            return self.token_choice_outputs(probs, logits, gates_dense, expert_index, position, kept,
                                             chosen * kept, load, capacity, requested, (slot_token, slot_weight))
        gates, expert_index = ops.topk(probs, 2)                                   # (G, T, 2)
        second = gates[:, :, 1:] / ops.sum(gates, -1, keepdim=True)                # (G, T, 1)
        keep2 = ops.cast(self.uniform(second.shape) < 2.0 * second, ms.float32)    # (G, T, 1)
        requested = ops.concat((ops.ones_like(keep2), keep2), -1)                  # (G, T, 2)
        position, kept = assign_positions(expert_index, self.num_experts, capacity, requested)
        combine = gates * kept                                                     # (G, T, 2)
        chosen = ops.gather_elements(probs, 2, expert_index)                       # (G, T, 2)
        if self.normalize:
            denom = ops.sum(chosen, -1, keepdim=True)                              # (G, T, 1)
            combine = combine / denom
            chosen = chosen / denom
        gates_dense, load = self.gate_stats(expert_index, chosen, requested)
        return self.token_choice_outputs(probs, logits, gates_dense, expert_index, position, kept, combine, load,
                                         capacity, requested)


class NoisyTopKRouter(Router):
    """Sparsely-gated MoE gating of Shazeer et al. 2017, equations (3)-(5), and its balancing losses (6)-(11).

    H(x) = x W_g + StandardNormal() * Softplus(x W_noise) (noise only while training; ``moe.noise_epsilon`` is
    added to the Softplus as in the authors' tensor2tensor code, 0 gives the bare equation), G(x) =
    Softmax(KeepTopK(H(x), k)) with KeepTopK setting all but the k largest to -inf. Importance loss = CV(sum_x G(x))^2;
    load loss = CV(sum_x P(x, i))^2 with the smooth normal-CDF estimator P while training (k < E), the hard 0/1
    counts otherwise (no gradient there, as in tensor2tensor).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.moe
        # W_noise (E, H); the paper initialises W_g and W_noise to zero ("no signal and some noise" at the start).
        self.noise = Linear(cfg.hidden_size, m.num_experts, "embed", None, has_bias=False,
                            init_std=cfg.initializer_range, compute_dtype="float32")
        for w in (self.gate.weight, self.noise.weight):
            w.set_data(Tensor(np.zeros(w.shape, np.float32)))
        self.noise_epsilon = m.noise_epsilon
        self.sample_noise = StandardNormal()
        self.neg_inf = Tensor(float("-inf"), ms.float32)

    def construct(self, x):
        """x (G, T, H) -> ROUTER_FIELDS tuple."""
        x = self.cast(x, ms.float32)
        clean = self.gate(x)                                                       # (G, T, E) x W_g
        capacity = self.capacity(x.shape[1])
        if self.training:
            noise_std = ops.softplus(self.noise(x)) + self.noise_epsilon           # (G, T, E)
            logits = clean + self.sample_noise(clean.shape) * noise_std                  # (G, T, E) H(x), eq. (4)
        else:
            noise_std = ops.ones_like(clean)
            logits = clean
        _, top = ops.topk(logits, self.k)                                          # (G, T, k)
        in_top = ops.sum(ops.one_hot(top, self.num_experts, 1.0, 0.0), 2) > 0     # (G, T, E)
        gates = ops.softmax(ops.select(in_top, logits, ops.full_like(logits, self.neg_inf)), -1)  # eq. (3), (5)
        expert_index, combine, position, kept = route_topk_grouped(gates, self.k, capacity)
        if self.training and self.k < self.num_experts:
            load = load_loss(smooth_load(clean, logits, noise_std, self.k))        # eq. (8)-(11)
        else:
            load = load_loss(ops.cast(in_top, ms.float32))
        return self.token_choice_outputs(gates, logits, gates, expert_index, position, kept, combine, load,
                                         capacity, ops.ones_like(kept))


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its C highest-scoring tokens of the group.

    S = softmax(x W_g) over experts (float32); G, I = TopK(S^T, C) per expert with C = ceil(T * top_k * factor / E)
    (``top_k * capacity_factor`` is the paper's capacity factor c, the average experts per token). Loads are
    balanced by construction; a token no expert picks is "dropped" (only the residual carries it). The auxiliary
    losses are computed for monitoring and weighted by the same config coefficients (the paper uses none: set
    them to 0 to follow it).
    """

    def construct(self, x):
        """x (G, T, H) -> ROUTER_FIELDS tuple."""
        x = self.cast(x, ms.float32)
        g, t, _ = x.shape
        logits = self.gate(x)                                                      # (G, T, E)
        probs = ops.softmax(logits, -1)                                            # (G, T, E)
        capacity = self.capacity(t)
        slot_weight, slot_token = ops.topk(ops.transpose(probs, (0, 2, 1)), capacity)   # (G, E, C)
        slot_token = ops.stop_gradient(slot_token)
        group = ops.reshape(ops.arange(g, dtype=ms.int32), (g, 1, 1)) * t          # (G, 1, 1)
        taken = ops.unsorted_segment_sum(ops.ones((g * self.num_experts * capacity,), ms.float32),
                                         ops.reshape(slot_token + group, (-1,)), g * t)   # (G*T,)
        dropped = ops.mean(ops.cast(taken == 0, ms.float32))
        per_expert = ops.fill(ms.float32, (self.num_experts,), 1.0 / self.num_experts)   # (E,) C slots each
        aux, losses = self.weighted(switch_load_balance(probs, ops.argmax(probs, -1).astype(ms.int32)),
                                    router_z_loss(logits), importance_loss(probs), load_loss(per_expert))
        return (slot_token, slot_weight, probs, logits, aux, losses, per_expert, ops.stop_gradient(dropped))


ROUTERS = {"topk": TopKRouter, "noisy_topk": NoisyTopKRouter, "expert_choice": ExpertChoiceRouter}


def make_router(cfg) -> Router:
    """The router ``cfg.moe.router`` names."""
    name = cfg.moe.router
    if name not in ROUTERS:
        raise ValueError(f"model.moe.router: unknown router '{name}'; valid: {sorted(ROUTERS)}")
    return ROUTERS[name](cfg)
