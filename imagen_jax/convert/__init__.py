"""Checkpoint porters: DeepFloyd IF UNets (diffusers format) into our UNet, and back.

``python -m imagen_jax.convert deepfloyd-if --src DIR --out DIR`` converts
one IF pipeline folder or bare UNet folder; ``deepfloyd_if.load_unet`` loads
one in memory; ``export-diffusers`` (``if_export``) writes a diffusers UNet
folder from a converted stage or a run's IF-layout stage. A converted folder
is a run: ``imagen_jax.cascade.Cascade.from_workdir`` and ``sample.py
--workdir`` sample it as they sample a trained run, and its stages are
ordinary ``imagen_jax.stages`` (``diffusion.kind = 'discrete'``). (Hugging
Face T5 encoders load directly: ``imagen_jax.text.TextEncoder.from_pretrained``.)
"""
