"""Does the BatchNorm prior (jaxjpeg.priors) help a network it was not measured on?

A small Flax ResNet (BatchNorm after every conv, ReLU after the residual add:
not the EfficientNet-lite family the prior was measured on) trained on
scikit-learn's bundled digits (upsampled to 16x16; ~4 min on 2 cores), then
saved at 8, 10 and 12x with and without ``batchnorm_prior``. Prints top-1
agreement and KL of the restored model's logits against the float32 model's
on the held-out digits.

    python benchmarks/batchnorm_prior.py
"""

import time, tempfile
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn, optax
from sklearn.datasets import load_digits
import jaxjpeg

class Block(nn.Module):
    ch: int
    stride: int = 1
    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(self.ch, (3, 3), self.stride, use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.ch, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        if x.shape != y.shape:
            x = nn.Conv(self.ch, (1, 1), self.stride, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.relu(x + y)

class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(64, (3, 3), use_bias=False)(x)))
        for ch, s in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
            x = Block(ch, s)(x, train)
        x = x.mean((1, 2))
        return nn.Dense(10)(x)

d = load_digits()
X = (d.images / 16.0).astype(np.float32)[..., None]
X = np.asarray(jax.image.resize(X, (len(X), 16, 16, 1), "bilinear"))
Y = d.target
rng = np.random.default_rng(0); perm = rng.permutation(len(X))
tr, te = perm[:1400], perm[1400:]
model = ResNet()
v = model.init(jax.random.PRNGKey(0), X[:2], train=True)
params, bs = v["params"], v["batch_stats"]
tx = optax.adam(2e-3); opt = tx.init(params)
@jax.jit
def step(params, bs, opt, x, y):
    def loss(p):
        out, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), upd["batch_stats"], opt, l
t = time.time()
for ep in range(12):
    idx = rng.permutation(tr)
    for i in range(0, len(idx) - 63, 64):
        b = idx[i:i+64]
        params, bs, opt, l = step(params, bs, opt, X[b], Y[b])
print(f"trained in {time.time() - t:.0f} s, last loss {float(l):.2e}")
variables = {"params": params, "batch_stats": bs}
n = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(f"{n} parameters")
ref = np.asarray(model.apply(variables, X[te]))
print(f"float32 test accuracy {np.mean(ref.argmax(1) == Y[te]):.3f}")
def logsm(z): z = z - z.max(1, keepdims=True); return z - np.log(np.exp(z).sum(1, keepdims=True))
def metrics(out):
    p = logsm(ref); q = logsm(out)
    return f"agree {np.mean(out.argmax(1) == ref.argmax(1)):.3f} KL {np.mean((np.exp(p) * (p - q)).sum(1)):.4f}"
from jaxjpeg import priors
print(f"{len(priors.input_power(variables))} kernels paired with a BatchNorm")
print("ratio prior  file bytes  metrics")
dd = tempfile.mkdtemp()
for ratio in (8, 10, 12):
    for prior in (False, True):
        rep = jaxjpeg.save(f"{dd}/x", variables, target_ratio=ratio, batchnorm_prior=prior, progress=False)
        r = jaxjpeg.restore(f"{dd}/x")
        print(f"{ratio:5d} {prior!s:5} {rep.file_bytes:11d}  "
              f"{metrics(np.asarray(model.apply(r, X[te])))}", flush=True)
