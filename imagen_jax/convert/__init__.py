"""Checkpoint porters: DeepFloyd IF UNets (diffusers format) into our UNet.

``python -m imagen_jax.convert deepfloyd-if --src DIR --out DIR`` converts
one IF pipeline folder; ``deepfloyd_if.load_unet`` loads one in memory;
``if_sampling`` samples converted IF stages. (Hugging Face T5 encoders load
directly: ``imagen_jax.text.TextEncoder.from_pretrained``.)
"""
