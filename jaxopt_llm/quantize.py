"""int8 for an export's dense layers, two ways.

"int8" (weight-only, either format): every `kernel` leaf (..., k, n) is stored as int8 with one float32 scale
per output column (and per layer or member along any leading axes): scale = max |w| over the k inputs / 127, q
= round(w / scale), so each weight is within scale / 2 of its float value. The exported function multiplies
them back to float32 before use: activations, matrix products, embeddings, norms and biases stay float32. It
makes the artifact's dense weights 4x smaller; on CPUs without fast int8 products it does not make prediction
faster.

"int8-dynamic" (ONNX only): model.onnx's matrix products with a constant weight run on ONNX Runtime's integer
kernels: weights int8 with one scale per output column, activations quantized to uint8 per call from their
own range (DynamicQuantizeLinear), products accumulated in int32. The jax.export functions stay float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "int8-dynamic")
ONNX_ONLY = ("int8-dynamic",)


def is_kernel(path) -> bool:
    """Whether a `jax.tree_util` key path ends in a dense layer's `kernel` (what int8 quantizes)."""
    return any(getattr(k, "key", None) == "kernel" for k in path)


def int8_kernels(params) -> tuple[list[np.ndarray], Callable[[list], list]]:
    """(stored arrays, rebuild): the parameters' leaves in `jax.tree.flatten` order with each float kernel of
    two or more axes replaced by its int8 values followed by its float32 scales; `rebuild(stored)` (traceable)
    gives the leaves back, kernels dequantized."""
    stored, plan = [], []  # plan: per leaf, its index in `stored`, whether a scale follows, its dtype
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(x)
        plan.append((len(stored), is_kernel(path) and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating),
                     x.dtype))
        if plan[-1][1]:
            w = x.astype(np.float32)
            scale = np.max(np.abs(w), axis=-2, keepdims=True) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero column stays zero
            stored += [np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale]
        else:
            stored.append(x)

    def rebuild(arrays: list) -> list:
        return [(arrays[i].astype(jnp.float32) * arrays[i + 1]).astype(dtype) if quantized else arrays[i]
                for i, quantized, dtype in plan]

    return stored, rebuild


def onnx_dynamic_int8(source: Path, target: Path) -> None:
    """`source` (an ONNX graph whose dense layers are MatMul against an initializer) written to `target` with
    those products on ONNX Runtime's integer kernels (`onnxruntime.quantization.quantize_dynamic`, int8
    weights per output column)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = logging.NullHandler()  # its advice to pre-process goes to the root logger; it would add a handler
    root.addHandler(quiet)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)
