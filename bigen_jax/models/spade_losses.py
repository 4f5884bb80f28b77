"""Losses of the SPADE GAN (METHOD.md §6), pure functions with keyword-only arguments.

Hinge adversarial loss (Lim & Ye 2017) on D's per-cell logits; ACGAN cross-entropy of each cell's cluster id,
for D on real and fake images (Odena et al. 2017) and for G on fake ones; discriminator feature matching (L1
between D's block features on real and fake images, summed over blocks as pix2pixHD and SPADE do); and an
optional perceptual loss ``perceptual_fn(fake, real) -> scalar`` (the paper's: ImageNet ResNet-50 features);
and an optional pixel L1 reconstruction (not the paper's: it lets a small generator learn a simple world in a
few hundred CPU steps, where no pretrained ResNet-50 exists). ``weights`` is the config's ``loss_weights``
(adversarial, acgan, feature_matching, perceptual, reconstruction; paper 1/1/10/10/0). The caller stops the
gradient into G for D's loss (D sees stop_gradient(fake images)).
"""

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from bigen_jax.models.spade import DiscriminatorOutput

Array = jax.Array


def discriminator_hinge_loss(*, real_logits: Array, fake_logits: Array) -> Array:
  """mean(relu(1 - real)) + mean(relu(1 + fake)); logits of any shape (here [B, 8, 8]) -> scalar."""
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_hinge_loss(*, fake_logits: Array) -> Array:
  """-mean(fake logits) -> scalar."""
  return -jnp.mean(fake_logits)


def acgan_loss(*, class_logits: Array, cluster_ids: Array) -> Array:
  """Mean cross-entropy of the cells' cluster ids: class_logits [B, 8, 8, K], cluster_ids int [B, 8, 8] or
  [B, 64] (row-major) -> scalar."""
  ids = jnp.asarray(cluster_ids).reshape(class_logits.shape[:-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(class_logits.astype(jnp.float32), ids))


def feature_matching_loss(*, real_features: Sequence[Array], fake_features: Sequence[Array]) -> Array:
  """Sum over D's blocks of mean |real - fake| ([B, H, W, C] each); the real features are held constant, so
  only G learns from it."""
  return sum(jnp.mean(jnp.abs(jax.lax.stop_gradient(r) - f)) for r, f in zip(real_features, fake_features))


def discriminator_loss(*, real: DiscriminatorOutput, fake: DiscriminatorOutput, cluster_ids: Array,
                       weights: Mapping[str, float]) -> tuple[Array, dict[str, Array]]:
  """D's loss: adversarial * hinge + acgan * (CE on real + CE on fake) -> (scalar, metrics)."""
  hinge = discriminator_hinge_loss(real_logits=real.logits, fake_logits=fake.logits)
  acgan_real = acgan_loss(class_logits=real.class_logits, cluster_ids=cluster_ids)
  acgan_fake = acgan_loss(class_logits=fake.class_logits, cluster_ids=cluster_ids)
  loss = weights["adversarial"] * hinge + weights["acgan"] * (acgan_real + acgan_fake)
  return loss, dict(loss=loss, hinge=hinge, acgan_real=acgan_real, acgan_fake=acgan_fake,
                    real_logit=jnp.mean(real.logits), fake_logit=jnp.mean(fake.logits))


def generator_loss(*, fake: DiscriminatorOutput, real: DiscriminatorOutput, cluster_ids: Array,
                   weights: Mapping[str, float], perceptual_fn: Callable[[Array, Array], Array] | None = None,
                   fake_images: Array | None = None, real_images: Array | None = None
                   ) -> tuple[Array, dict[str, Array]]:
  """G's loss: adversarial * hinge + acgan * CE on fake + feature_matching * FM (+ perceptual *
  perceptual_fn(fake_images, real_images) when given; + reconstruction * mean |fake_images - real_images| when
  its weight is set; images [B, S, S, 3] in [-1, 1]) -> (scalar, metrics)."""
  hinge = generator_hinge_loss(fake_logits=fake.logits)
  acgan = acgan_loss(class_logits=fake.class_logits, cluster_ids=cluster_ids)
  matching = feature_matching_loss(real_features=real.features, fake_features=fake.features)
  loss = weights["adversarial"] * hinge + weights["acgan"] * acgan + weights["feature_matching"] * matching
  metrics = dict(hinge=hinge, acgan=acgan, feature_matching=matching)
  if perceptual_fn is not None:
    if fake_images is None or real_images is None:
      raise ValueError("perceptual_fn needs fake_images and real_images")
    metrics["perceptual"] = perceptual_fn(fake_images, real_images)
    loss = loss + weights["perceptual"] * metrics["perceptual"]
  if weights.get("reconstruction", 0.0):
    if fake_images is None or real_images is None:
      raise ValueError("the reconstruction loss needs fake_images and real_images")
    metrics["reconstruction"] = jnp.mean(jnp.abs(fake_images - real_images))
    loss = loss + weights["reconstruction"] * metrics["reconstruction"]
  metrics["loss"] = loss
  return loss, metrics
