"""Fine-tuning converted DeepFloyd IF stages with train.py.

  python -m imagen_jax.convert deepfloyd-if --src IF-I-XL-v1.0 --out if/if_I
  python train.py --config configs/deepfloyd_if.py:if/if_I --workdir runs/if_ft \
      --config.data.src=my_images/

The argument names converted stage folders as ``sample.py --workdir`` takes
them (one folder, 'A,B', or a folder holding them). Each stage starts from its
converted weights (``init_from``) and trains IF's objective (ε MSE plus the
learned-variance bound term, ``imagen_jax.stages.discrete``) under the same
sharding presets, resume and SIGTERM handling as our own stages; the frozen
T5 is the one recorded at conversion. The result is an ordinary run:
``sample.py --workdir runs/if_ft`` samples it, and
``python -m imagen_jax.convert export-diffusers`` writes it back to diffusers.
"""

from imagen_jax import run as run_lib


def get_config(path: str = ""):
  if not path:
    raise ValueError(
      "configs/deepfloyd_if.py needs the converted stage folder(s): "
      "--config configs/deepfloyd_if.py:PATH"
    )
  config = run_lib.read_config(path)
  for name in config.stage_order:
    stage = config.stages[name]
    stage.init_from = stage.source  # weights to start from; the run's own after that
    stage.source = ""  # sampling reads the run's checkpoints, not these
  config.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  config.mesh.strategy = "fsdp"
  config.data.update(dict(name="image_captions", data_dir="data", src=""))
  config.data.builder_kwargs = dict(
    max_resolution=max(s.resolution for s in config.stages.values())
  )
  config.train.update(
    dict(
      num_steps=2000,
      batch_size=16,
      lr=1e-5,
      warmup_steps=100,
      end_lr_frac=1.0,
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      log_every=10,
      checkpoint_every=200,
      sample_every=0,
    )
  )
  return config
