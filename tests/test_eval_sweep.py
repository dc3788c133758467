"""The evaluation CLIs end to end on a tiny random-weight cascade, and eval during training."""

import json
import math
import os

import pytest
from PIL import Image
from safetensors.numpy import save_file

from imagen_jax import cascade as cascade_lib
from imagen_jax.data import shapes as shapes_data
from imagen_jax.eval import during_training, fid, fid_stats, inception, metrics, sweep
from imagen_jax import run as run_lib
from imagen_jax.stages import build_stage
from imagen_jax.text import TextEncoder

from test_sample_cli import make_run

CLIP_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "clip_tiny")
NUM = 8  # images per setting: one jitted batch on the 8 fake devices


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A run (random weights, 32px final stage), synthetic Inception weights, reference stats."""
  root = tmp_path_factory.mktemp("eval")
  make_run(root / "run")
  weights = str(root / "inception.safetensors")
  save_file(inception.synthetic_state_dict(0), weights)
  folder = root / "reference"
  folder.mkdir()
  for i in range(12):  # shapes images at 48px: resized to 32 by fid_stats
    image = shapes_data.sample_scene((7, 0, i), 48)[0]
    Image.fromarray(image).save(folder / f"{i:02d}.png")
  stats = {32: str(root / "ref32.npz"), 16: str(root / "ref16.npz")}
  assert (
    fid_stats.main(
      [
        "--folder",
        str(folder),
        "--resolution",
        "32",
        "--inception",
        weights,
        "--inception_resolution",
        "75",
        "--batch",
        str(NUM),
        "--out",
        stats[32],
      ]
    )
    == 0
  )
  ref = metrics.FeatureStats.load(stats[32])
  assert (ref.count, ref.image_resolution, ref.network_resolution) == (12, 32, 75)
  ref.image_resolution = 16  # as from fid_stats --resolution 16: refused for 32px samples
  ref.save(stats[16])
  return {"run": str(root / "run"), "weights": weights, "stats": stats, "root": root}


def _common(files):
  return [
    "--workdir",
    files["run"],
    "--steps",
    "2,2",
    "--batch",
    str(NUM),
    "--inception",
    files["weights"],
    "--inception_resolution",
    "75",
  ]


@pytest.mark.slow
def test_sweep_end_to_end(files, capsys):
  out = files["root"] / "sweep"
  rc = sweep.main(
    _common(files)
    + [
      "--guidance",
      "2,5",
      "--metrics",
      "fid,clip,shapes",
      "--num",
      str(NUM),
      "--reference",
      files["stats"][32],
      "--clip",
      CLIP_DIR,
      "--out",
      str(out),
    ]
  )
  assert rc == 0
  table = json.loads((out / "sweep.json").read_text())
  rows = table["rows"]
  assert [r["guidance"] for r in rows] == [2.0, 5.0]
  for r in rows:
    assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert 0 <= r["clip_score"] <= 100 and 0 <= r["shapes_accuracy"] <= 1
    assert r["shapes"]["count"] == NUM
  assert table["settings"]["stage"] == "base" and table["settings"]["num"] == NUM
  assert Image.open(out / "sweep.png").size == (720, 520)
  assert '"fid"' in capsys.readouterr().out


@pytest.mark.slow
def test_fid_cli(files, tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle in the top left\n\na blue square in the center\n")
  path = tmp_path / "fid.json"
  rc = fid.main(
    _common(files)
    + [
      "--reference",
      files["stats"][32],
      "--prompts_file",
      str(prompts),
      "--num",
      str(NUM),
      "--clip",
      CLIP_DIR,
      "--out",
      str(path),
    ]
  )
  assert rc == 0
  result = json.loads(path.read_text())
  assert result["num"] == NUM and math.isfinite(result["fid"]) and result["fid"] > 0
  assert result["image_resolution"] == 32 and result["inception_resolution"] == 75
  assert result["clip_score"]["count"] == NUM


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--metrics", "shapes,fid", "--reference", "REF16"], "statistics differ in image_resolution"),
    (["--metrics", "fid,bleu", "--prompts_file", "PROMPTS"], "unknown metrics ['bleu']"),
    (["--metrics", "shapes,fid"], "metric fid needs --reference"),
    (["--metrics", "clip", "--prompts_file", "PROMPTS"], "metric clip needs --clip"),
    (["--metrics", "shapes,fid", "--reference", "/nonexistent.npz"], "/nonexistent.npz: no such"),
    (["--metrics", "shapes", "--stage", "nope"], "--stage 'nope' is not one of"),
  ],
)
def test_sweep_bad_input(files, capsys, tmp_path, extra, message):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle\n")
  extra = [{"REF16": files["stats"][16], "PROMPTS": str(prompts)}.get(a, a) for a in extra]
  assert sweep.main(_common(files) + ["--guidance", "1,2", "--num", "4"] + extra) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_sweep_guidance_must_be_numbers(files, capsys):
  assert sweep.main(_common(files) + ["--guidance", "1,x"]) == 2
  assert "--guidance must be comma-separated numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_during_training(files):
  config = run_lib.read_config(files["run"])
  # FID during training runs the 299px network: too slow for this test (the
  # metric itself is the CLIs' code, tested above); shapes and CLIP here.
  config.train.update(
    dict(eval_every=2, eval_metrics=("shapes", "clip"), eval_num=NUM, eval_clip=CLIP_DIR)
  )
  mesh, rules = cascade_lib.sampling_mesh(config)
  encoder = TextEncoder.from_config(config.text, mesh, rules)
  with pytest.raises(ValueError, match="eval_clip"):
    during_training.make_eval_fn(_with(config, eval_clip=""), files["run"], encoder)
  with pytest.raises(ValueError, match="eval_inception and eval_reference"):
    during_training.make_eval_fn(_with(config, eval_metrics=("fid",)), files["run"], encoder)
  eval_fn = during_training.make_eval_fn(config, files["run"], encoder, mesh, rules)
  # The SR stage: the base stage comes from its checkpoint, sr from the given params.
  stage = build_stage(config.stages.sr, text_dim=encoder.embed_dim)
  params, _ = run_lib.load_ema_params(files["run"], stage, mesh, rules)
  out = eval_fn(stage, params, 7)
  assert 0 <= out["eval/shapes_accuracy"] <= 1 and out["eval/seconds"] > 0
  assert 0 <= out["eval/clip_score"] <= 100
  assert all(isinstance(v, float) for v in out.values())


def _with(config, **train):
  config = config.copy_and_resolve_references()
  config.train.update(train)
  return config
