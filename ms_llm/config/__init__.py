"""Frozen, validated configs; YAML maps onto them strictly."""
from .base import ConfigError, from_dict, to_dict
from .model import ModelConfig, MoEConfig
from .parallel import ParallelConfig
from .train import DataConfig, TrainConfig
from .run import RunConfig, apply_overrides, dump_config, load_config

__all__ = ["ConfigError", "from_dict", "to_dict", "ModelConfig", "MoEConfig", "ParallelConfig", "DataConfig",
           "TrainConfig", "RunConfig", "apply_overrides", "dump_config", "load_config"]
