"""The demo cascade (32×32 base → 64×64 SR) on your own captioned images.

A folder of images (prepared once into TFDS array_record, then read with
random access):

  python train.py --config configs/own_data.py --workdir runs/mine \
      --config.data.src=my_images/

`my_images/` holds images with same-stem `.txt` captions (one caption per line)
or a `captions.jsonl` (see `imagen_jax.data.captions`). The first run prepares
them under `data/image_captions/max64/` (shorter side scaled to at most 64
pixels, the largest stage resolution; `--config.data.builder_kwargs.max_resolution`
changes it); later runs reuse that, or prepare again when the folder changed.

Shards streamed as they are (img2dataset's output; local paths or gs://):

  python train.py --config configs/own_data.py:webdataset --workdir runs/mine \
      --config.data.src='gs://bucket/laion/{00000..41454}.tar'
  python train.py --config configs/own_data.py:parquet --workdir runs/mine \
      --config.data.src='my_parquet/*.parquet'

(see `imagen_jax.data.streaming`: `data.shuffle_buffer`, `data.interleave`,
`data.decode_workers`, and the parquet columns `data.image_column`,
`data.caption_column`, `data.key_column`, the webdataset json field
`data.caption_json_field`).

The model, text encoder (a frozen random T5 over ByT5 bytes unless
`--config.text.path` names a T5) and schedule are the demo's; set
`--config.train.num_steps` and `--config.train.sample_prompts` to suit.

  python train.py --config configs/own_data.py:tiny ...            # seconds, for tests
  python train.py --config configs/own_data.py:webdataset,tiny ...  # variants combine
"""

import os

from imagen_jax import config as config_lib

_FORMATS = ("webdataset", "parquet")


def get_config(variant: str = ""):
  parts = [p for p in variant.split(",") if p]
  formats = [p for p in parts if p in _FORMATS]
  if len(formats) > 1:
    raise ValueError(f"configs/own_data.py:{variant}: at most one of {', '.join(_FORMATS)}")
  demo_variant = ",".join(p for p in parts if p not in _FORMATS)
  demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  config = config_lib.load_config(f"{demo}:{demo_variant}" if demo_variant else demo)
  largest = max(s.resolution for s in config.stages.values())
  config.data.update(
    dict(name="image_captions", data_dir="data", split="train", src="", prepare=True)
  )
  # Replaced, not updated: the demo's shapes settings do not apply here.
  config.data.builder_kwargs = dict(max_resolution=largest)
  if formats:  # streamed shards: no TFDS dataset, nothing prepared
    config.data.update(dict(format=formats[0], name="", prepare=False))
    config.data.builder_kwargs = {}
  config.train.sample_prompts = ()  # The demo's are about shapes.
  # Open vocabulary: ByT5 bytes, not a word list fitted on the demo's few words.
  config.text.update(dict(fit_tokenizer="", max_length=88))
  return config
