"""X-LXMERT's image generator (METHOD.md §6): a SPADE GAN from an 8x8 grid of visual-token centroid features to
pictures, in Flax linen, NHWC, float32.

Generator: grid [B, 8, 8, D] -> 1x1 conv bottleneck + tanh (the condition c [B, 8, 8, bottleneck]) -> 3x3 stem
to ``gen_width`` channels at 8x8 -> ``num_blocks`` residual up-blocks (nearest 2x, then twice: SPADE instance
norm, LeakyReLU(0.2), 3x3 conv, learned-scale noise) -> after each block a 1x1 ToRGB; the RGB outputs are
upsampled and summed (skip connections) -> tanh, [-1, 1]. SPADE (Park et al. 2019): a parameter-free
instance norm, then x (1 + gamma) + beta with per-pixel gamma, beta predicted by a small conv net (3x3 to
``spade_hidden``, ReLU, two 3x3 heads) from c resized (nearest) to the block's resolution.

Discriminator: ``num_blocks`` residual down-blocks (two 3x3 convs with instance norm, 2x average pool) back
to the 8x8 grid, then 1x1 heads: a hinge logit per cell (a patch discriminator) and the ACGAN logits of each
cell's cluster id; it also returns every block's output for feature matching (``spade_losses``).

Size: the generator starts at the grid's own resolution (one pixel per cell), so ``image_size`` decides the
block count, log2(image_size / 8): 5 at COCO's 256 px (the paper's), 4 for the demo world's 128 px. The
discriminator mirrors it and ends on the grid, where the ACGAN head scores each cell. Starting below 8x8
would pool cells together before the first block and lose what each one says.

Spectral norm (Miyato et al. 2018) on the stem and up-block convs of G and on every conv of D (heads
included); the bottleneck, SPADE's modulation nets and ToRGB are plain, as in SPADE. Functional: each such
conv keeps its power-iteration vector u in the "spectral" collection, advanced only when called with
``update_stats=True`` (train with ``mutable=["spectral"]``), read only otherwise (eval, ``decode_image``).

Parameters (``param_counts``): paper config G 1,614,159 (the paper: ~1.7M), D 984,465 (~0.5M). D's ACGAN
head, a 1x1 conv to 10,000 clusters, holds 650,000 of them; the rest (334,465) is below the paper's figure,
whose block widths are not published. Demo config: G 390,572, D 99,585.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from bigen_jax.data import records

Array = jax.Array
GRID = records.GRID
_INIT_ITERATIONS = 15  # power iterations from a random u at init, so that an untrained net is normalised too
_EPS = 1e-12
_NORM_EPS = 1e-5
_SLOPE = 0.2


def spade_config(variant: str = "paper", **overrides: Any) -> ml_collections.ConfigDict:
  """The GAN's config: the paper's values (``paper``), the demo world's (``demo``: 27-d features, 1024
  clusters, 128 px) or a seconds-fast one for tests (``tiny``: 32 px), then ``overrides`` (known keys only).

  image_size (a multiple 8 * 2**n; it sets the block count), feature_dim (D of the centroids), bottleneck,
  gen_width, spade_hidden, disc_width, num_clusters, power_iterations (per training call), loss_weights
  (``spade_losses``), and the paper's recipe: Adam (b1, b2), gen_lr, disc_lr, batch_size, num_epochs.
  """
  config = ml_collections.ConfigDict(dict(
      image_size=256, feature_dim=2048, bottleneck=256, gen_width=32, spade_hidden=32, disc_width=64,
      num_clusters=10000, power_iterations=1,
      loss_weights=dict(adversarial=1.0, acgan=1.0, feature_matching=10.0, perceptual=10.0,
                        reconstruction=0.0),
      gen_lr=4e-4, disc_lr=1e-4, b1=0.0, b2=0.999, batch_size=96, num_epochs=60))
  if variant == "demo":
    config.update(dict(image_size=128, feature_dim=27, bottleneck=64, disc_width=32, num_clusters=1024,
                       batch_size=32))
  elif variant == "tiny":
    config.update(dict(image_size=32, feature_dim=8, bottleneck=16, gen_width=8, spade_hidden=8, disc_width=8,
                       num_clusters=12, batch_size=2))
  elif variant != "paper":
    raise ValueError(f"spade_config: unknown variant {variant!r}: expected 'paper', 'demo' or 'tiny'")
  config.lock()
  config.update(overrides)
  num_blocks(config.image_size)
  return config


def num_blocks(image_size: int) -> int:
  """Up-blocks of G (= down-blocks of D) from the 8x8 grid to ``image_size``: log2(image_size / 8)."""
  blocks = (image_size // GRID).bit_length() - 1
  if image_size < 2 * GRID or GRID * 2**blocks != image_size:
    raise ValueError(f"image_size {image_size} is not {GRID} * 2**n with n >= 1 (16, 32, ..., 128, 256)")
  return blocks


def power_iteration(matrix: Array, u: Array, steps: int) -> Array:
  """``steps`` power iterations on W^T W: matrix W [M, N], unit u [N] -> the next estimate of W's top right
  singular vector [N]."""
  def step(_, u):
    v = matrix @ u
    v = v / (jnp.linalg.norm(v) + _EPS)
    u = matrix.T @ v
    return u / (jnp.linalg.norm(u) + _EPS)
  return jax.lax.fori_loop(0, steps, step, u)


def spectral_normalize(kernel: Array, u: Array) -> Array:
  """kernel [..., N] / sigma, sigma = |W u| with W = kernel reshaped [-1, N] and u [N] held constant: the
  gradient is that of v^T W u with v = W u / |W u|, as in Miyato et al."""
  sigma = jnp.linalg.norm(kernel.reshape(-1, kernel.shape[-1]) @ jax.lax.stop_gradient(u))
  return kernel / jnp.maximum(sigma, _EPS)


def instance_norm(x: Array) -> Array:
  """Parameter-free instance norm: [B, H, W, C] normalised over H, W per example and channel (biased variance,
  eps 1e-5, as ``torch.nn.InstanceNorm2d``)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _NORM_EPS)


def upsample(x: Array, factor: int) -> Array:
  """Nearest-neighbour upsampling of [B, H, W, C] by an integer factor."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _lrelu(x: Array) -> Array:
  return nn.leaky_relu(x, _SLOPE)


class Conv(nn.Module):
  """A KxK conv with zero "SAME" padding and bias, optionally spectrally normalised.

  Params kernel [K, K, I, O] (logical axes conv_height, conv_width, conv_in, ``out_axis``) and bias [O]; with
  ``spectral`` also u [O] in the "spectral" collection (``power_iterations`` steps per training call).
  """
  features: int
  kernel_size: int = 3
  spectral: bool = False
  power_iterations: int = 1
  out_axis: str = "conv_out"

  @nn.compact
  def __call__(self, x: Array, update_stats: bool = False) -> Array:
    """x [B, H, W, I] -> [B, H, W, O]."""
    k = self.kernel_size
    names = ("conv_height", "conv_width", "conv_in", self.out_axis)
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
                      (self.features,), jnp.float32)
    if self.spectral:
      kernel = self._normalize(kernel, update_stats)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias

  def _normalize(self, kernel: Array, update_stats: bool) -> Array:
    matrix = kernel.reshape(-1, self.features)

    def init_u():
      u = jax.random.normal(self.make_rng("params"), (self.features,), jnp.float32)
      u = power_iteration(matrix, u / jnp.linalg.norm(u), _INIT_ITERATIONS)
      return nn.LogicallyPartitioned(u, names=(self.out_axis,))

    u_var = self.variable("spectral", "u", init_u)
    u = u_var.value
    if update_stats and not self.is_initializing():
      u = jax.lax.stop_gradient(power_iteration(matrix, u, self.power_iterations))
      u_var.value = u
    return spectral_normalize(kernel, u)


class Noise(nn.Module):
  """x + scale * noise: one N(0, 1) value per pixel, a learned scale [C] per channel (zeros at init, as in
  StyleGAN). ``noise`` [B, H, W, 1] when given, else drawn from the "noise" rng."""

  @nn.compact
  def __call__(self, x: Array, noise: Array | None = None) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                       (x.shape[-1],), jnp.float32)
    if noise is None:
      noise = jax.random.normal(self.make_rng("noise"), x.shape[:-1] + (1,), x.dtype)
    return x + scale * noise


class SPADE(nn.Module):
  """SPADE instance norm: instance_norm(x) (1 + gamma) + beta, gamma and beta [B, H, W, C] predicted from the
  condition resized to x's resolution."""
  hidden: int

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x [B, H, W, C], cond [B, 8, 8, E] -> [B, H, W, C]."""
    cond = upsample(cond, x.shape[1] // cond.shape[1])
    h = nn.relu(Conv(self.hidden, name="shared")(cond))
    gamma = Conv(x.shape[-1], name="gamma")(h)
    beta = Conv(x.shape[-1], name="beta")(h)
    return instance_norm(x) * (1.0 + gamma) + beta


class UpBlock(nn.Module):
  """Residual up-block: x = up(x); x + noise(conv(lrelu(SPADE(noise(conv(lrelu(SPADE(x)))))))."""
  hidden: int
  power_iterations: int = 1

  @nn.compact
  def __call__(self, x: Array, cond: Array, noise: Sequence[Array | None], update_stats: bool) -> Array:
    """x [B, H, W, C], cond [B, 8, 8, E], noise two of [B, 2H, 2W, 1] or None -> [B, 2H, 2W, C]."""
    x = upsample(x, 2)
    conv = functools.partial(Conv, x.shape[-1], spectral=True, power_iterations=self.power_iterations)
    h = conv(name="conv_0")(_lrelu(SPADE(self.hidden, name="norm_0")(x, cond)), update_stats)
    h = Noise(name="noise_0")(h, noise[0])
    h = conv(name="conv_1")(_lrelu(SPADE(self.hidden, name="norm_1")(h, cond)), update_stats)
    h = Noise(name="noise_1")(h, noise[1])
    return x + h


class Generator(nn.Module):
  """Centroid grid -> image (see the module docstring). Variables: params, spectral."""
  width: int = 32
  bottleneck: int = 256
  spade_hidden: int = 32
  num_blocks: int = 5
  power_iterations: int = 1

  @nn.compact
  def __call__(self, grid: Array, *, update_stats: bool = False,
               noise: Sequence[Array] | None = None) -> Array:
    """grid [B, 8, 8, D] -> images float32 [B, S, S, 3] in [-1, 1], S = 8 * 2**num_blocks.

    noise: the 2 * num_blocks noise maps (``noise_shapes``) or None to draw them from the "noise" rng.
    """
    cond = jnp.tanh(Conv(self.bottleneck, kernel_size=1, name="bottleneck")(grid.astype(jnp.float32)))
    x = Conv(self.width, spectral=True, power_iterations=self.power_iterations, name="stem")(cond, update_stats)
    rgb = None
    for i in range(self.num_blocks):
      maps = (None, None) if noise is None else noise[2 * i:2 * i + 2]
      x = UpBlock(self.spade_hidden, self.power_iterations, name=f"block_{i}")(x, cond, maps, update_stats)
      y = Conv(3, kernel_size=1, name=f"to_rgb_{i}")(_lrelu(x))
      rgb = y if rgb is None else upsample(rgb, 2) + y
    return jnp.tanh(rgb)


def noise_shapes(blocks: int, batch: int) -> list[tuple[int, int, int, int]]:
  """Shapes of the generator's noise maps, in the order ``Generator(noise=...)`` takes them."""
  return [(batch, GRID * 2**(i // 2 + 1), GRID * 2**(i // 2 + 1), 1) for i in range(2 * blocks)]


@flax.struct.dataclass
class DiscriminatorOutput:
  """logits [B, 8, 8] (hinge, one per cell); class_logits [B, 8, 8, K] (ACGAN: each cell's cluster id);
  features: each down-block's output [B, S / 2**(i+1), S / 2**(i+1), C] (feature matching)."""
  logits: Array
  class_logits: Array
  features: tuple[Array, ...]


class DownBlock(nn.Module):
  """Residual down-block: lrelu(pool(IN(conv(lrelu(IN(conv(x))))) + shortcut(x))), 1x1 shortcut when the
  width changes."""
  features: int
  power_iterations: int = 1

  @nn.compact
  def __call__(self, x: Array, update_stats: bool) -> Array:
    """x [B, H, W, I] -> [B, H/2, W/2, features]."""
    conv = functools.partial(Conv, self.features, spectral=True, power_iterations=self.power_iterations)
    h = _lrelu(instance_norm(conv(name="conv_0")(x, update_stats)))
    h = instance_norm(conv(name="conv_1")(h, update_stats))
    if x.shape[-1] != self.features:
      x = conv(kernel_size=1, name="shortcut")(x, update_stats)
    return _lrelu(nn.avg_pool(h + x, (2, 2), strides=(2, 2)))


class Discriminator(nn.Module):
  """Image -> hinge logits per cell, ACGAN cluster logits per cell, block features. Variables: params,
  spectral."""
  width: int = 64
  num_blocks: int = 5
  num_clusters: int = 10000
  power_iterations: int = 1

  @nn.compact
  def __call__(self, images: Array, *, update_stats: bool = False) -> DiscriminatorOutput:
    """images [B, S, S, 3] in [-1, 1], S = 8 * 2**num_blocks."""
    x = images.astype(jnp.float32)
    features = []
    for i in range(self.num_blocks):
      x = DownBlock(self.width, self.power_iterations, name=f"block_{i}")(x, update_stats)
      features.append(x)
    head = functools.partial(Conv, kernel_size=1, spectral=True, power_iterations=self.power_iterations)
    logits = head(1, name="adversarial")(x, update_stats)[..., 0]
    class_logits = head(self.num_clusters, out_axis="clusters", name="acgan")(x, update_stats)
    return DiscriminatorOutput(logits=logits, class_logits=class_logits, features=tuple(features))


def build_generator(config: ml_collections.ConfigDict) -> Generator:
  return Generator(width=config.gen_width, bottleneck=config.bottleneck, spade_hidden=config.spade_hidden,
                   num_blocks=num_blocks(config.image_size), power_iterations=config.power_iterations)


def build_discriminator(config: ml_collections.ConfigDict) -> Discriminator:
  return Discriminator(width=config.disc_width, num_blocks=num_blocks(config.image_size),
                       num_clusters=config.num_clusters, power_iterations=config.power_iterations)


def init_generator(config: ml_collections.ConfigDict, rng: Array) -> dict[str, Any]:
  """G's variables {"params", "spectral"}, boxed with logical axis names (``nn.unbox`` for plain arrays)."""
  generator = build_generator(config)

  def init(key):
    params_rng, noise_rng = jax.random.split(key)
    grid = jnp.zeros((1, GRID, GRID, config.feature_dim), jnp.float32)
    return dict(generator.init({"params": params_rng, "noise": noise_rng}, grid))
  return jax.jit(init)(rng)


def init_discriminator(config: ml_collections.ConfigDict, rng: Array) -> dict[str, Any]:
  """D's variables {"params", "spectral"}, boxed with logical axis names."""
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.jit(lambda key: dict(build_discriminator(config).init({"params": key}, images)))(rng)


def param_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Trainable parameters of G and D (``jax.eval_shape``: nothing allocated); the spectral vectors are not
  counted."""
  def count(init):
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0)))["params"]
    return sum(int(x.size) for x in jax.tree.leaves(shapes))
  return dict(generator=count(init_generator), discriminator=count(init_discriminator))


def generator_from_variables(variables: Any) -> Generator:
  """The ``Generator`` whose variables these are: widths and block count read from the param shapes, so a
  frozen generator is one pytree and needs no config."""
  params = nn.unbox(variables)["params"]
  return Generator(width=params["stem"]["kernel"].shape[-1], bottleneck=params["bottleneck"]["kernel"].shape[-1],
                   spade_hidden=params["block_0"]["norm_0"]["shared"]["kernel"].shape[-1],
                   num_blocks=sum(name.startswith("block_") for name in params))


def centroid_grid(codebook: Array, cluster_ids: Array) -> Array:
  """codebook [K, D], cluster_ids int [B, 64] (cells row-major) -> the quantised grid [B, 8, 8, D] float32: what
  the generator reads."""
  grid = jnp.take(codebook, cluster_ids, axis=0).astype(jnp.float32)
  return grid.reshape(cluster_ids.shape[0], GRID, GRID, codebook.shape[-1])


def decode_image(gen_params: Any, centroid_grid: Array, rng: Array) -> Array:
  """Frozen generator: centroid features -> float32 images [B, S, S, 3] in [-1, 1] (``to_uint8`` for pixels).

  gen_params: G's variables {"params", "spectral"} (boxed or plain); the spectral state is read, never
  updated. centroid_grid [B, 8, 8, D] or [B, 64, D] (cells row-major, as the boxes). rng: the noise key; the
  same key gives the same images. Jittable. Floats, not uint8: the CLIP and Inception ports resize and
  normalise from floats, and the images stay differentiable.
  """
  variables = nn.unbox(gen_params)
  grid = jnp.asarray(centroid_grid)
  if grid.ndim == 3:
    grid = grid.reshape(grid.shape[0], GRID, GRID, grid.shape[-1])
  generator = generator_from_variables(variables)
  return generator.apply({"params": variables["params"], "spectral": variables["spectral"]}, grid,
                         rngs={"noise": rng})


def to_uint8(images: Array) -> Array:
  """[-1, 1] float images -> uint8 [0, 255] (rounded, clipped)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def bake_spectral_norm(variables: Any) -> dict[str, Any]:
  """Plain params (unboxed) whose spectrally normalised kernels are divided by their sigma, read from the
  spectral state: the weights an eval-mode call uses, for export or another framework (``torch_spade``)."""
  variables = nn.unbox(variables)
  params = flax.traverse_util.flatten_dict(variables["params"])
  for path, u in flax.traverse_util.flatten_dict(variables["spectral"]).items():
    kernel = path[:-1] + ("kernel",)
    params[kernel] = spectral_normalize(params[kernel], u)
  return flax.traverse_util.unflatten_dict(params)


if __name__ == "__main__":
  for name in ("paper", "demo"):
    print(name, param_counts(spade_config(name)))
