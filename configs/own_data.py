"""The demo cascade (32×32 base → 64×64 SR) on your own captioned images.

  python train.py --config configs/own_data.py --workdir runs/mine \
      --config.data.src=my_images/

`my_images/` holds images with same-stem `.txt` captions (one caption per line)
or a `captions.jsonl` (see `imagen_jax.data.captions`). The first run prepares
them under `data/image_captions/max64/` (shorter side scaled to at most 64
pixels, the largest stage resolution; `--config.data.builder_kwargs.max_resolution`
changes it); later runs reuse that, or prepare again when the folder changed.
The model, text encoder (a frozen random T5 over ByT5 bytes unless
`--config.text.path` names a T5) and schedule are the demo's; set
`--config.train.num_steps` and `--config.train.sample_prompts` to suit.

  python train.py --config configs/own_data.py:tiny ...   # seconds, for tests
"""

import os

from imagen_jax import config as config_lib


def get_config(variant: str = ""):
  demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  config = config_lib.load_config(f"{demo}:{variant}" if variant else demo)
  largest = max(s.resolution for s in config.stages.values())
  config.data.update(
    dict(name="image_captions", data_dir="data", split="train", src="", prepare=True)
  )
  # Replaced, not updated: the demo's shapes settings do not apply here.
  config.data.builder_kwargs = dict(max_resolution=largest)
  config.train.sample_prompts = ()  # The demo's are about shapes.
  # Open vocabulary: ByT5 bytes, not a word list fitted on the demo's few words.
  config.text.update(dict(fit_tokenizer="", max_length=88))
  return config
