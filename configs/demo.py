"""The CPU demo cascade on the synthetic shapes data: 32×32 base → 64×64 SR.

A frozen, randomly initialized small T5 over a word-level vocabulary fitted on the
training captions (saved with the run; no files needed), a ~5.7M-parameter base
UNet with a 2×2 space-to-depth stem, a token convolution and two trainable text
layers, single-head text attention at 8×8 and 4×4 whose queries know their
position, trained with extra examples at high noise, and a ~1.7M-parameter
Efficient-UNet super-resolution stage. Sized so that training both stages and
sampling a grid takes about 12½ minutes on the 2-core Intel Xeon of the README's
figures; slower CPUs take longer (README: how ``benchmarks.train_loop`` predicts it).

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:tiny --workdir runs/tiny   # seconds, for tests
"""

from imagen_jax import config as config_lib


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.text.update(
    dict(
      dim=128,
      # A word-level vocabulary fitted on the training captions (WORKDIR/tokenizer):
      # one token per word, so 24 tokens hold the longest caption (15 words + EOS).
      fit_tokenizer="words",
      max_length=24,
      dtype="float32",
      seed=0,
      random=dict(vocab_size=384, d_model=128, d_kv=32, d_ff=256, num_layers=4, num_heads=4),
    )
  )
  config.data.update(
    dict(
      name="shapes",
      data_dir="data",
      split="train",
      builder_kwargs=dict(
        resolution=64,
        num_train=20000,
        num_test=500,
        num_holdout=500,
        holdout=("green triangle",),
        two_object_share=0.5,  # of the train split; test and holdout stay half and half
      ),
      # One dataset at the SR stage's 64 px: the 32 px base stage reads it downscaled 2×.
      downscale=True,
    )
  )
  config.mesh.shape = {"data": -1}
  config.mesh.strategy = "dp"
  config.train.update(
    dict(
      num_steps=1600,
      batch_size=32,
      lr=2e-3,
      warmup_steps=100,
      end_lr_frac=0.05,
      weight_decay=0.0,
      b2=0.99,
      grad_clip=1.0,
      ema_decay=0.998,
      log_every=25,
      checkpoint_every=500,
      sample_every=0,
      sample_prompts=(
        "a red circle in the top left",
        "a blue square in the center",
        "a yellow triangle in the bottom right",
        "a white circle in the top right and a cyan square in the bottom left",
      ),
    )
  )

  # Text attention at 8×8 (text keys only: a few % of the step) and at 4×4 and in
  # the middle (with image keys); over the frozen encoder's tokens, a convolution
  # (each position word reads its own phrase's color and shape) and two trainable
  # transformer layers. The attention queries carry their own position codes, and
  # start from them alone (attention_query_pos): at high noise the image features
  # are noise, and queries made of them cannot pick the phrase that names their
  # quadrant. Self-attention at 8×8 costs a sizeable share of the step on 2 cores
  # (benchmarks/RESULTS.md: demo design and demo binding tables).
  base = dict(
    channels=(48, 96, 128),
    num_res_blocks=(1, 1, 2),
    attention=("none", "cross", "self_cross"),
    mid_attention="self_cross",
    num_heads=1,
    patch_size=2,
    norm_groups=16,
    text_dim=config.text.dim,
    text_pool="attention",
    text_pool_heads=4,
    text_layers=2,
    text_layer_heads=4,
    text_layer_max_offset=16,
    text_conv_kernel=11,
    attention_pos_embed=False,
    attention_query_pos=True,
    dtype="float32",
  )
  stage = config_lib.stage_config("base", 32, base)
  # Which object goes where is decided at high noise, where the image holds no trace
  # of the layout: an extra 30% of the training t from [0.9, 1] (37% there in all).
  stage.diffusion.high_noise_share = 0.3
  stage.sample.update(dict(sampler="ddim", steps=50, guidance=3.0, threshold="static"))
  config_lib.add_stage(config, stage)

  sr = config_lib.efficient_unet((32, 64, 96), (1, 1, 2), "cross", config.text.dim)
  sr.update(
    dict(
      head_dim=32, norm_groups=16, text_pool_heads=4, remat="none", patch_size=2, dtype="float32"
    )
  )
  stage = config_lib.stage_config("sr", 64, sr, lowres_resolution=32)
  stage.steps_scale = 0.5
  # x0 prediction: the super-resolved image is the low-res one, sharpened, at every
  # noise level. With v prediction this small SR stage stayed speckled and lost
  # most of the base stage's accuracy (the SR table in benchmarks/RESULTS.md).
  stage.diffusion.prediction = "x0"
  stage.diffusion.aug_max = 0.3
  stage.sample.update(
    dict(sampler="ddim", steps=25, guidance=1.0, threshold="static", aug_level=0.1)
  )
  config_lib.add_stage(config, stage)

  if variant == "tiny":  # seconds on a CPU: tests and smoke runs
    config.text.random.update(dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    # ByT5 bytes: tests build encoders from this config without a trained run.
    config.text.update(dict(dim=32, fit_tokenizer="", max_length=88))
    config.data.builder_kwargs.update(
      dict(resolution=32, num_train=64, num_test=16, num_holdout=16)
    )
    config.train.update(
      dict(num_steps=4, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=2)
    )
    for name, res in (("base", 16), ("sr", 32)):
      s = config.stages[name]
      s.resolution = res
      s.model.update(
        dict(channels=(16, 32, 32), norm_groups=8, text_dim=32, text_pool_heads=2, patch_size=1)
      )
      s.sample.steps = 4
    config.stages.sr.lowres_resolution = 16
    config.stages.sr.model.head_dim = 16
  elif variant:
    raise ValueError(f"unknown demo variant {variant!r}; expected '' or 'tiny'")
  return config
