"""Mixture of experts: routers, dispatcher, batched experts, auxiliary losses and the MoE feed-forward layer."""
from .dispatcher import Dispatcher, ExpertExchange
from .experts import Experts
from .layer import MoELayer, moe_log_metrics, moe_stats
from .router import (ROUTER_FIELDS, ExpertChoiceRouter, NoisyTopKRouter, TopKRouter, expert_capacity, make_router,
                     route_topk)

__all__ = ["Dispatcher", "ExpertExchange", "Experts", "MoELayer", "moe_log_metrics", "moe_stats", "ROUTER_FIELDS",
           "TopKRouter", "NoisyTopKRouter", "ExpertChoiceRouter", "expert_capacity", "make_router", "route_topk"]
