"""Config layout shared by every ``configs/*.py`` file, and loading by path.

A config describes a cascade::

  config.text         frozen text encoder (T5) and the text length
  config.stage_order  names of the stages, generation order
  config.stages.NAME  one stage: resolution, lowres_resolution, model, diffusion, sample
  config.mesh         device mesh shape and sharding strategy
  config.train        optimisation and run-length settings shared by the stages

``config.stages.NAME.model`` holds the fields of ``imagen_jax.models.UNetConfig``.
Files return ``get_config()`` (big_vision style); command lines override with
``--config.a.b=value``.
"""

import importlib.util
import os
from typing import Optional

import ml_collections


def stage_config(
  name: str, resolution: int, model: dict, lowres_resolution: Optional[int] = None
) -> ml_collections.ConfigDict:
  """A stage with default diffusion and sampling settings."""
  stage = ml_collections.ConfigDict()
  stage.name = name
  stage.resolution = resolution
  stage.lowres_resolution = lowres_resolution
  stage.steps_scale = 1.0  # this stage trains round(train.num_steps · steps_scale)
  stage.model = ml_collections.ConfigDict(model)
  stage.diffusion = ml_collections.ConfigDict(
    dict(
      prediction="v",  # 'eps' | 'x0' | 'v'
      schedule="cosine",  # continuous log-SNR schedule of training noise
      logsnr_min=-20.0,
      logsnr_max=20.0,
      logsnr_shift=0.0,  # added to λ(t); > 0 trains (and samples) more at low noise
      min_snr_gamma=0.0,  # > 0 turns on Min-SNR-γ loss weighting
      # Draw this extra share of training t from [high_noise_from, 1] (continuous
      # stages; 0: uniform t): more examples where the layout comes from text alone.
      high_noise_share=0.0,
      high_noise_from=0.9,
      cond_drop=0.1,  # classifier-free guidance text dropout
      aug_schedule="linear",  # schedule of the low-resolution noise augmentation
      aug_max=0.5,  # training samples aug levels t_aug ~ U[0, aug_max]
    )
  )
  stage.sample = ml_collections.ConfigDict(
    dict(
      sampler="ddim",  # 'ddim' | 'ddpm'
      steps=64,
      eta=0.0,
      guidance=5.0,
      threshold="dynamic",  # 'none' | 'static' | 'dynamic'
      quantile=0.995,
      aug_level=0.1,  # noise-augmentation level of the low-res input
    )
  )
  return stage


def efficient_unet(channels, blocks, lowest_attention, text_dim):
  """``config.model`` of an Imagen super-resolution Efficient UNet (sr256, sr1024, demo)."""
  return dict(
    channels=channels,
    num_res_blocks=blocks,
    attention=("none",) * (len(channels) - 1) + (lowest_attention,),
    mid_block=False,
    efficient=True,
    skip_scale=2**-0.5,
    lowres_cond=True,
    aug_embed=True,
    head_dim=64,
    text_dim=text_dim,
    text_proj_dim=channels[-1],
    text_pool="attention",
    text_pool_projected=True,
    dtype="bfloat16",
    param_dtype="float32",
    remat="full",
  )


def base_config() -> ml_collections.ConfigDict:
  """Top-level groups with defaults; the stage files fill ``stages``."""
  config = ml_collections.ConfigDict()
  config.text = ml_collections.ConfigDict(
    dict(
      path="",  # local Hugging Face T5 directory; '' = random init
      tokenizer="",  # tokenizer directory ('' = path's, or ByT5 bytes if random)
      # 'words': the trainer fits a word-level tokenizer on the training captions
      # and saves it with the run (WORKDIR/tokenizer); '' = use `tokenizer`.
      fit_tokenizer="",
      dim=4096,  # width of the embeddings the UNets expect
      max_length=128,  # tokens per caption (longer ones are truncated)
      precomputed=False,  # train on cached embeddings (imagen_jax.train.embeddings)
      embed_dir="",  # their directory ('' = DATA_DIR/embeddings/NAME/SPLIT)
      dtype="bfloat16",
      seed=0,  # random init only
      # random init only: one ALiBi-style slope per head for the relative-position
      # bias (TextEncoder.random_init: tokens carry their neighbours); () = T5's init.
      random_locality=(),
      # T5Config fields of the random-init encoder (used when path is '').
      random=dict(vocab_size=384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    )
  )
  config.data = ml_collections.ConfigDict(
    dict(
      name="shapes",  # 'shapes' | 'image_captions' | a prepared TFDS name
      data_dir="data",
      split="train",
      builder_kwargs={},  # e.g. shapes: resolution, num_train, holdout
      prepare=True,  # prepare shapes/image_captions when missing
      src="",  # image_captions: the folder of images; streamed: shard files/glob/{0..9} range
      seed=0,
      # '' (TFDS: name/data_dir/split) | 'webdataset' | 'parquet' (streamed from src,
      # imagen_jax.data.streaming).
      format="",
      image_column="jpg",  # parquet (img2dataset's columns)
      caption_column="caption",  # parquet
      key_column="key",  # parquet; the row index when the file has no such column
      caption_json_field="caption",  # webdataset: the json member's caption field
      shuffle_buffer=1000,  # streamed: records in the shuffle buffer
      interleave=4,  # streamed: shards read at a time per process
      decode_workers=0,  # streamed: decoding threads per process (0: min(4, CPUs))
      # True: stages below the stored resolution read the images downscaled by an
      # integer factor, by design (a cascade's lower stages on its top stage's data).
      downscale=False,
    )
  )
  config.stage_order = ()
  config.stages = ml_collections.ConfigDict()
  config.mesh = ml_collections.ConfigDict(
    dict(
      shape={"data": 1, "fsdp": -1, "tensor": 1},
      strategy="fsdp",  # a preset of imagen_jax.parallel.STRATEGIES
      rules="",  # overrides of the preset, e.g. 'mlp=tensor;embed=none'
    )
  )
  config.train = ml_collections.ConfigDict(
    dict(
      num_steps=100_000,  # per stage, times the stage's steps_scale
      batch_size=256,  # global
      grad_accum=1,  # microbatches per step (gradients summed in float32)
      optimizer="adamw",  # 'adamw' | 'adafactor'
      lr=1e-4,
      warmup_steps=10_000,
      end_lr_frac=0.1,  # cosine decay ends at lr · end_lr_frac
      weight_decay=0.0,
      b1=0.9,
      b2=0.99,
      grad_clip=1.0,
      ema_decay=0.9999,
      seed=0,
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=2,
      max_nonfinite_steps=10,  # consecutive non-finite (skipped) steps before stopping
      async_checkpoint=True,
      sample_every=0,  # 0: no sample grids during training
      sample_prompts=(),  # captions of the training sample grids
      eval_every=0,  # 0: no metrics during training (imagen_jax.eval.during_training)
      eval_metrics=("shapes",),  # 'shapes' (pixel checker), 'clip', 'fid'
      eval_prompts=(),  # () = the shapes test captions
      eval_num=64,  # prompts per evaluation (cycled)
      eval_batch_size=0,  # images per sampler call; 0 = all at once
      eval_clip="",  # Hugging Face CLIP folder, for 'clip'
      eval_inception="",  # FID InceptionV3 weights (.safetensors), for 'fid'
      eval_reference="",  # reference statistics (imagen_jax.eval.fid_stats), for 'fid'
    )
  )
  return config


def add_stage(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> None:
  """Appends ``stage`` to the cascade."""
  config.stages[stage.name] = stage
  config.stage_order = tuple(config.stage_order) + (stage.name,)


def stage_train_config(
  config: ml_collections.ConfigDict, stage_name: str
) -> ml_collections.ConfigDict:
  """``config.train`` with this stage's step count (num_steps · steps_scale)."""
  tc = config.train.copy_and_resolve_references()
  scale = float(config.stages[stage_name].get("steps_scale", 1.0))
  tc.num_steps = max(1, int(round(config.train.num_steps * scale)))
  return tc


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a Python file; ``path`` may end with ``:arg``."""
  arg = None
  if ".py:" in path:  # the argument may itself be a path (configs/deepfloyd_if.py:if/if_I)
    path, arg = path.split(".py:", 1)
    path += ".py"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_imagen_jax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  return module.get_config() if arg is None else module.get_config(arg)
