"""Diffusion synthetic NG: defect images with masks drawn from zero to a few real NG.

``ngcal generate diffusion`` (``run.generate_diffusion``) turns good training images into NG
images: a target mask is drawn (``targets``), a backend paints a defect inside it (``fewshot``:
a small mask-conditioned pixel diffusion model trained on crops around the real NG;
``pretrained``: a local Stable Diffusion inpainting folder), every candidate goes through the
quality ``gate`` and the accepted ones are scored by the product's PatchCore model like real
images. The interface between the parts is in ``backend``.
"""
