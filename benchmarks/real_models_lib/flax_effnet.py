"""EfficientNet-lite as a Flax linen module, for what needs the network in JAX
(``jaxjpeg.calibration.synthetic_inputs``). Built from the torch model's
blocks and weights; its logits match torch's to ~1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np


class Depthwise(nn.Module):
    """A depthwise SAME convolution (TensorFlow's padding, as the torch port's
    static padding) as a sum of shifted products: XLA on CPU runs grouped
    convolutions' gradients 4-6x slower than this."""

    size: int
    stride: int

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.zeros, (self.size, self.size, 1, channels))
        k, s = self.size, self.stride
        out_h, out_w = -(-x.shape[1] // s), -(-x.shape[2] // s)
        pad_h = max((out_h - 1) * s + k - x.shape[1], 0)
        pad_w = max((out_w - 1) * s + k - x.shape[2], 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        out = 0
        for i in range(k):
            for j in range(k):
                tap = x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :]
                out = out + tap * kernel[i, j, 0]
        return out


class Block(nn.Module):
    """MBConv without squeeze-excitation: expand, depthwise, project (+ skip)."""

    expand: int       # expanded channels, 0: no expansion
    out: int
    size: int
    stride: int
    skip: bool
    eps: float

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.BatchNorm(True, epsilon=self.eps, name=name)
        y = x
        if self.expand:
            y = nn.Conv(self.expand, (1, 1), use_bias=False, name="expand")(y)
            y = jax.nn.relu6(norm("bn0")(y))
        y = jax.nn.relu6(norm("bn1")(Depthwise(self.size, self.stride, name="depthwise")(y)))
        y = norm("bn2")(nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y))
        return y + x if self.skip else y


class EffNetLite(nn.Module):
    blocks: tuple
    stem: int
    head: int
    classes: int
    eps: float

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.BatchNorm(True, epsilon=self.eps, name=name)
        x = nn.Conv(self.stem, (3, 3), (2, 2), padding="SAME", use_bias=False, name="stem")(x)
        x = jax.nn.relu6(norm("bn0")(x))
        for i, block in enumerate(self.blocks):
            x = Block(*block, eps=self.eps, name=f"block{i}")(x)
        x = jax.nn.relu6(norm("bn1")(nn.Conv(self.head, (1, 1), use_bias=False, name="head")(x)))
        return nn.Dense(self.classes, name="fc")(x.mean((1, 2)))


def from_torch(model):
    """``(module, variables)`` of an ``efficientnet_lite_pytorch`` model (NHWC inputs)."""
    def array(p):
        return np.asarray(p.detach().numpy(), np.float32)

    def conv(c):
        return {"kernel": array(c.weight).transpose(2, 3, 1, 0)}

    def norm(b):
        return ({"scale": array(b.weight), "bias": array(b.bias)},
                {"mean": array(b.running_mean), "var": array(b.running_var)})

    params, stats, blocks = {"stem": conv(model._conv_stem)}, {}, []
    params["bn0"], stats["bn0"] = norm(model._bn0)
    for i, blk in enumerate(model._blocks):
        args = blk._block_args
        p, s, expand = {}, {}, 0
        if args.expand_ratio != 1:
            p["expand"] = conv(blk._expand_conv)
            p["bn0"], s["bn0"] = norm(blk._bn0)
            expand = blk._expand_conv.weight.shape[0]
        p["depthwise"] = conv(blk._depthwise_conv)
        p["bn1"], s["bn1"] = norm(blk._bn1)
        p["project"] = conv(blk._project_conv)
        p["bn2"], s["bn2"] = norm(blk._bn2)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        skip = bool(blk.id_skip and stride == 1 and args.input_filters == args.output_filters)
        blocks.append((expand, blk._project_conv.weight.shape[0],
                       blk._depthwise_conv.weight.shape[-1], stride, skip))
        params[f"block{i}"], stats[f"block{i}"] = p, s
    params["head"] = conv(model._conv_head)
    params["bn1"], stats["bn1"] = norm(model._bn1)
    params["fc"] = {"kernel": array(model._fc.weight).T, "bias": array(model._fc.bias)}
    module = EffNetLite(tuple(blocks), model._conv_stem.weight.shape[0],
                        model._conv_head.weight.shape[0], model._fc.weight.shape[0],
                        float(model._bn0.eps))
    return module, {"params": params, "batch_stats": stats}
