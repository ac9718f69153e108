"""The networks and the multimodal VAE: image and text encoders/decoders, fusion of experts, the model.

Taught in notebooks/02_image_vae.ipynb, 03_text_vae.ipynb and 04_fusion.ipynb.
"""

from mvae_course.models.mvae import MultimodalVAE

__all__ = ["MultimodalVAE"]
