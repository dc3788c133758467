"""Fine-tuning converted Stable Diffusion stages (SD 1.x / 2.x, the x4 upscaler) with train.py.

  python -m imagen_jax.convert stable-diffusion --src stable-diffusion-v1-5 --out sd/sd15
  python train.py --config configs/stable_diffusion.py:sd/sd15 --workdir runs/sd_ft \
      --config.data.src=my_images/

The argument names converted folders as ``sample.py --workdir`` takes them (one
folder, 'A,B', or a folder holding them). Each latent stage starts from its converted
UNet and VAE (``init_from``) and trains only the UNet: the VAE is frozen (the stage's
``frozen`` groups get no gradient and no optimizer state, ``train.state.trainable``),
and so is the stage's own CLIP text tower, which encodes the captions inside the step.
The loss is the scheduler's ε or v MSE on the VAE latents; the x4 upscaler trains on
(image at R, its R/4 downsample noised to a random level in [0, max_noise_level])
pairs, the level as its class label. Sharding presets, resume and SIGTERM handling
are those of every stage. The result is an ordinary run: ``sample.py --workdir
runs/sd_ft`` samples it, and ``python -m imagen_jax.convert export-diffusers --src
runs/sd_ft --stage sd --out DIR`` writes it back as a diffusers pipeline.
"""

import os

from imagen_jax import config as config_lib


def get_config(path: str = ""):
  if not path:
    raise ValueError(
      "configs/stable_diffusion.py needs the converted Stable Diffusion folder(s): "
      "--config configs/stable_diffusion.py:PATH"
    )
  # The fine-tuning recipe is the same as for converted IF stages: one place for it.
  here = os.path.dirname(os.path.abspath(__file__))
  config = config_lib.load_config(os.path.join(here, f"deepfloyd_if.py:{path}"))
  return config
