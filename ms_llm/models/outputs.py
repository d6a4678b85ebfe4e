"""Hugging Face style named outputs for cells called from Python.

Inside a compiled graph a model returns a plain tuple; a top-level Python call of a cell that mixes in
:class:`NamedOutputs` wraps that tuple into a :class:`ModelOutput`, reachable by attribute, key or index.
"""
from __future__ import annotations

from collections import OrderedDict


class ModelOutput(OrderedDict):
    """Ordered mapping of output name -> Tensor with attribute access (``out.logits``) and ``out[0]``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"output has no field '{name}'; fields: {list(self.keys())}") from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(self.values())


class NamedOutputs:
    """Mixin for nn.Cell: ``output_names`` name the tuple that ``construct`` returns."""

    output_names: tuple = ()

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if not self.output_names:
            return out
        if not isinstance(out, (tuple, list)):
            out = (out,)
        if len(out) != len(self.output_names):
            raise RuntimeError(f"{type(self).__name__} returned {len(out)} outputs, names: {self.output_names}")
        return ModelOutput(zip(self.output_names, out))
