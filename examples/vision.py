"""VisionEmbedding: cut images into patch tokens, as zeta's README does (channels-last here).

    .venv/bin/python examples/vision.py
"""

import mlx_zeta  # noqa: F401  (routes BLAS before mlx.core)
import mlx.core as mx

from mlx_zeta.nn.vision import VisionEmbedding

mx.random.seed(0)

# zeta's README: a ViT-Base embedding with a BEiT mask token and a class token.
vision_embedding = VisionEmbedding(
    img_size=224,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    contain_mask_token=True,
    prepend_cls_token=True,
)
input_image = mx.random.uniform(shape=(1, 224, 224, 3))  # (batch, height, width, channels)
output = vision_embedding(input_image)
print(f"image {input_image.shape} -> tokens {output.shape} "
      f"(1 class token + {vision_embedding.num_patches} patches of {vision_embedding.patch_size})")
print(f"num_position_embeddings() = {vision_embedding.num_position_embeddings()}")

# BEiT masked image modelling: hide 40% of the patches behind the learned mask token.
masked_position = mx.random.uniform(shape=(1, vision_embedding.num_patches)) < 0.4
masked = vision_embedding(input_image, masked_position=masked_position)
hidden = int(masked_position.sum().item())
is_token = mx.all(masked[0, 1:] == vision_embedding.mask_token[0], axis=-1)  # (num_patches,)
same_as_token = mx.array_equal(is_token, masked_position[0]).item()
print(f"masked {hidden} of {vision_embedding.num_patches} patches; exactly those rows equal mask_token: {same_as_token}")
print(f"first token (class) mean {output[0, 0].mean().item():+.4f}, first patch mean {output[0, 1].mean().item():+.4f}")

# Rectangular images and patches work too.
rect = VisionEmbedding(img_size=(96, 64), patch_size=(16, 8), in_chans=1, embed_dim=32)
print(f"rectangular: {rect(mx.zeros((2, 96, 64, 1))).shape} with patch grid {rect.patch_shape}")
