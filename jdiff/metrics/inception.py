"""The FID Inception network (pytorch-fid's ``InceptionV3`` with its FID blocks) in Flax, NHWC.

The architecture is Inception-v3 (Szegedy et al. 2016) as in the TensorFlow graph ``inception-2015-12-05``
that FID (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016) were defined with, i.e.
pytorch-fid's ``fid_inception_v3``: torchvision's ``Inception3`` stem and Mixed_6a / Mixed_7a, with the
FID blocks Mixed_5b-d (``FIDInceptionA``), Mixed_6b-e (``FIDInceptionC``) and Mixed_7b/7c
(``FIDInceptionE_1`` / ``_2``), whose 3x3 average pools exclude the zero padding from the mean
(``count_include_pad=False``, as TensorFlow's), and whose last block (Mixed_7c) pools with a 3x3 max pool
instead. Every convolution is conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU.

Module and parameter names are the PyTorch state-dict names (``Mixed_6b.branch7x7_2.conv.weight``), so the
weights of pytorch-fid's ``pt_inception-2015-12-05-*.pth`` map one to one (`jdiff.metrics.inception_weights`);
convolution kernels are stored HWIO and the classifier matrix (in, out).

Input: (N, 299, 299, 3) in [-1, 1] (`preprocess` resizes and rescales images in [0, 1] as pytorch-fid does).
Output: the 2048 pool3 features and, through ``fc`` (without its bias, as the Inception Score's reference
code), the 1008 logits. Convolutions and matrix products run at
``Precision.HIGHEST`` (no TF32 / bf16 passes on accelerators), so features agree with float32 references.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SIZE = 299  # pytorch-fid resizes every image to 299 x 299
FEATURES = 2048  # pool3
CLASSES = 1008  # the 2015-12-05 graph's softmax (1000 ImageNet classes + 8 unused)
BN_EPS = 1e-3
HIGHEST = lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Module):
    """Convolution without bias; ``weight`` is HWIO (torch's OIHW transposed); explicit (ph, pw) padding."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel)
        w = self.param("weight", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        ph, pw = _pair(self.padding)
        return lax.conv_general_dilated(
            x,
            w,
            (self.stride, self.stride),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=HIGHEST,
        )


class BatchNorm(nn.Module):
    """Inference batch norm with torch's parameter names: (x - running_mean) / sqrt(running_var + eps) * w + b."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (w * lax.rsqrt(var + BN_EPS)) + b


class BasicConv2d(nn.Module):
    """conv -> batch norm -> ReLU (torchvision's ``BasicConv2d``)."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        x = Conv(self.features, self.kernel, self.stride, self.padding, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def max_pool(x, window: int = 3, stride: int = 2, padding: int = 0):
    """torch ``max_pool2d`` (floor mode; padding counts as -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x):
    """3x3, stride 1, padding 1 average pool whose mean leaves out the padding (torch ``count_include_pad=False``,
    TensorFlow's ``SAME`` average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    h, w = x.shape[1:3]
    ones = np.pad(np.ones((h, w), np.float32), 1)
    count = sum(ones[i : i + h, j : j + w] for i in range(3) for j in range(3))  # 4, 6 or 9 cells
    return total / jnp.asarray(count, x.dtype)[None, :, :, None]


class InceptionA(nn.Module):
    """Mixed_5b/c/d (pytorch-fid ``FIDInceptionA``)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision ``InceptionB``): 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e (pytorch-fid ``FIDInceptionC``), factorised 7x7 convolutions."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision ``InceptionD``): 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nn.Module):
    """Mixed_7b (pytorch-fid ``FIDInceptionE_1``: average pool without the padding) and Mixed_7c
    (``FIDInceptionE_2``: 3x3 max pool, as in the TensorFlow graph)."""

    pool: str  # "avg" or "max"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            -1,
        )
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            -1,
        )
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class Classifier(nn.Module):
    """The classifier ``fc``: ``weight`` (in, out) (torch's (out, in) transposed) and ``bias``. Returns the
    logits without the bias, x @ weight: the Inception Score's reference code (Salimans et al. 2016,
    ``inception_score.py``: ``tf.matmul(pool3, w)`` with w the input of ``softmax/logits/MatMul``) and
    torch-fidelity's ``logits_unbiased`` take the softmax of these; the bias is read but unused."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.dot(x, w, precision=HIGHEST)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 (see module doc). ``__call__`` maps (N, 299, 299, 3) in [-1, 1] to the
    pool3 features (N, 2048); ``logits`` maps pool3 features to the 1008 logits of ``fc`` without its bias
    (`Classifier`)."""

    def setup(self):
        self.Conv2d_1a_3x3 = BasicConv2d(32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(192, 3)
        self.Mixed_5b = InceptionA(32)
        self.Mixed_5c = InceptionA(64)
        self.Mixed_5d = InceptionA(64)
        self.Mixed_6a = InceptionB()
        self.Mixed_6b = InceptionC(128)
        self.Mixed_6c = InceptionC(160)
        self.Mixed_6d = InceptionC(160)
        self.Mixed_6e = InceptionC(192)
        self.Mixed_7a = InceptionD()
        self.Mixed_7b = InceptionE("avg")
        self.Mixed_7c = InceptionE("max")
        self.fc = Classifier(CLASSES)

    def __call__(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a):
            x = block(x)
        x = self.Mixed_7c(self.Mixed_7b(x))
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1: pool3

    def logits(self, features):
        return self.fc(features)

    def init_all(self, x):
        """Creates every parameter (the features and the classifier): `init` with ``method=init_all``."""
        return self.logits(self(x))


# ---------------------------------------------------------------------------------------------------
# Input: resize and rescale as pytorch-fid.


@lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of torch ``F.interpolate(mode='bilinear', align_corners=False)``
    along one axis, without antialiasing (so for up- and downsampling alike): output pixel i samples the input
    at s = (i + 0.5) * in/out - 0.5, clamped below at 0, between floor(s) and the next pixel (the last pixel
    repeats), with weights in float32 as torch's CPU kernel computes them: s = fma(in/out, i + 0.5, -0.5), one
    rounding (its vectorised loop fuses the multiply and subtract; two roundings move some weights by 1e-6)."""
    if in_size == out_size:
        return np.eye(out_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    half = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (half.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)  # exact product: one rounding
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    lam0 = np.float32(1.0) - lam1
    i1 = i0 + (i0 < in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m


def resize_bilinear(images: jax.Array, size: Sequence[int]) -> jax.Array:
    """(N, H, W, C) -> (N, size[0], size[1], C), torch's bilinear interpolation with ``align_corners=False`` and
    no antialiasing (``jax.image.resize`` antialiases when downsampling, so it differs there)."""
    h, w = images.shape[1:3]
    mh, mw = jnp.asarray(bilinear_matrix(h, size[0])), jnp.asarray(bilinear_matrix(w, size[1]))
    x = jnp.einsum("oh,nhwc->nowc", mh, images, precision=HIGHEST)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=HIGHEST)


def preprocess(images: jax.Array) -> jax.Array:
    """Images (N, H, W, 3) in [0, 1] -> the network's input: resized to 299 x 299 (`resize_bilinear`), then
    2 x - 1, in that order, as pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``."""
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (SIZE, SIZE):
        x = resize_bilinear(x, (SIZE, SIZE))
    return 2.0 * x - 1.0
