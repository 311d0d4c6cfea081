"""Bitwise-reproducible outputs on the CPU: independent of the batch and of where the weights were loaded from.

- Batch: a matrix product whose row count is the batch size (a class token per image, one image feature per
  image), a reduction with one output per image, or a batched product over images is computed by kernels that
  split the work differently for different batch sizes, so an image's result would change in the last bits with
  its batch. These few small operations run image by image (`per_sample`); the large products over all tokens of
  all images do not depend on the batch size.
- A graph traced for export (`torch.export`, `torch.onnx.export`, `torch.jit.trace`) serves every batch size, so
  there the image-by-image loop is one batched call (the loop would fix the batch size of the graph); eager and
  `torch.compile` runs keep the loop.
- Memory alignment: vectorized kernels peel unaligned elements first, which changes the summation order.
  Weights read from a safetensors file start wherever the file's header ends, so they are copied to aligned
  memory after loading (`align_tensors`) and give the same bits as weights created in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ALIGNMENT = 64  # bytes: a cache line, the widest vector registers


def per_sample(function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`function` applied to each sample (leading index) of `tensors` separately, results concatenated.

    While a graph is traced for export the samples go through one batched call (the same values, up to the last
    bits): an exported graph has a dynamic batch size, which a loop over the samples would fix.
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or tensors[0].shape[0] == 1:
        return function(*tensors)
    return torch.cat([function(*(t[i : i + 1] for t in tensors)) for i in range(tensors[0].shape[0])])


@torch.no_grad()
def align_tensors(module: torch.nn.Module) -> int:
    """Copy every parameter and buffer not aligned to `ALIGNMENT` bytes into fresh (aligned) memory; returns how
    many were moved. Values are unchanged."""
    moved = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
            tensor.data = tensor.data.clone()
            moved += 1
    return moved
