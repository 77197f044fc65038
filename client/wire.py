"""Flower ``Array`` forms of the tensors a site sends (light: the benchmarks import it without the
training stack)."""

from __future__ import annotations

import torch
from flwr.app import Array

from hermes_model.exchange import XOR_ZSTD_STYPE, encode_delta, to_wire


def reply_array(values: torch.Tensor, received: torch.Tensor, codec: str) -> Array:
    """One reply array: ``values`` (in the wire dtype) as a plain ``.npy`` array (codec ``none``), or coded
    against ``received``, the float tensor the site was sent (codec ``xor-zstd``, see
    ``hermes_model.exchange.encode_delta``)."""
    if codec == "none":
        return Array(values.numpy())
    wire = str(values.dtype).removeprefix("torch.")
    return Array(dtype=wire, shape=tuple(values.shape), stype=XOR_ZSTD_STYPE,
                 data=encode_delta(values, to_wire(received, wire)))
