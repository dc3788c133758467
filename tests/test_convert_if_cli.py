"""DeepFloyd IF conversion CLI: end to end (convert → load_converted → sample)
and bad input (nothing is written to --out unless everything succeeded)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from imagen_jax.convert import __main__ as cli
from imagen_jax.cascade import Cascade
from imagen_jax.convert import deepfloyd_if
from imagen_jax.safetensors_dir import WeightsReader

import sample as sample_cli  # noqa: E402  (the repo-root script)
import tiny

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
T5 = os.path.join(FIXTURES, "t5_v1_1")


make_src = tiny.if_pipeline  # the parity fixture as a pipeline folder, with the tiny T5


def run_cli(src, out, *extra):
  return cli.main(["deepfloyd-if", "--src", str(src), "--out", str(out), *extra])


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
  src1 = make_src("if_stage1", str(tmp_path / "IF-I"))
  src2 = make_src("if_stage2", str(tmp_path / "IF-II"))
  out1, out2 = tmp_path / "conv" / "if_I", tmp_path / "conv" / "if_II"
  assert run_cli(src1, out1) == 0
  assert run_cli(src2, out2, "--dtype", "bfloat16", "--lowres-resolution", "8") == 0
  assert sorted(os.listdir(tmp_path / "conv")) == ["if_I", "if_II"]  # no temp dirs left

  st1, p1 = deepfloyd_if.load_converted(str(out1))
  st2, p2 = deepfloyd_if.load_converted(str(out2))
  assert (st1.sample.guidance, st1.sample.max_value, st1.sample.quantile) == (7.0, 1.5, 0.95)
  assert (st2.sample.guidance, st2.sample.max_value, st2.sample.noise_level) == (4.0, 1.0, 250)
  assert st1.sample.threshold == "dynamic" and st1.sample.spacing == "leading"
  assert st2.lowres_resolution == 8 and st2.model.lowres_cond and not st1.text.use_mask
  _, expected = deepfloyd_if.load_unet(src1)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p1, expected)
  assert all(jax.tree.leaves(same))
  assert {x.dtype for x in jax.tree.leaves(p2)} == {np.dtype("bfloat16")}

  # The converted pair is a run: the same Cascade that samples trained runs,
  # with the stages' own IF settings (a named schedule for stage II).
  cascade = Cascade.from_workdir(f"{out1},{out2}")
  assert [s.kind for s in cascade.stages.values()] == ["discrete", "discrete"]
  assert cascade.text_len == 77 and not cascade.stages["if_I"].use_text_mask
  cascade.config.stages.if_II.sample.timesteps = "fast27"
  out = cascade.sample(
    ["a red cube", "two blue spheres"],
    jax.random.PRNGKey(0),
    steps={"if_I": 3},
    batch_size=2,
    progress=False,
  )
  assert out.settings["if_I"].timesteps == (666, 333, 0)  # leading spacing
  assert len(out.settings["if_II"].timesteps) == 27
  assert out.images["if_I"].shape == (2, 16, 16, 3)
  assert out.images["if_II"].shape == (2, 16, 16, 3)
  assert out.timings["if_II"].calls == 1 and out.timings["if_II"].run_s > 0

  # sample.py on the converted cascade: stage I, then stage II on its output
  # (--cascade is a synonym of --workdir).
  out = tmp_path / "samples"
  for flag in ("--workdir", "--cascade"):
    assert (
      sample_cli.main(
        [
          flag,
          f"{out1},{out2}",
          "--prompt",
          "a red cube",
          "--prompt",
          "two blue spheres",
          "--steps",
          "3,2",
          "--guidance",
          "7,off",
          "--out",
          str(out),
        ]
      )
      == 0
    )
  files = sorted(os.listdir(out))
  assert files == [
    "000_00.png",
    "001_00.png",
    "grid.png",
    "grid_if_I.png",
    "grid_if_II.png",
    "prompts.json",
  ], files
  assert (
    sample_cli.main(
      ["--workdir", f"{out1},{out2}", "--prompt", "x", "--steps", "3", "--out", str(out)]
    )
    == 2
  )
  # Solvers and editing on IF stages, from sample.py: DPM-Solver++ on stage I,
  # inpainting at both stages.
  from PIL import Image  # noqa: PLC0415

  init = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(init).save(tmp_path / "init.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[:8] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  edit = tmp_path / "edit"
  assert (
    sample_cli.main(
      [
        "--workdir",
        f"{out1},{out2}",
        "--prompt",
        "a red cube",
        "--sampler",
        "dpmpp_2m,ddpm",
        "--steps",
        "3,2",
        "--init_image",
        str(tmp_path / "init.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--out",
        str(edit),
      ]
    )
    == 0
  )
  final = np.asarray(Image.open(edit / "000_00.png"))
  assert (final[8:] == init[8:]).all()  # the unmasked half is kept exactly
  # A folder holding the converted stages is a run too.
  assert (
    sample_cli.main(
      ["--workdir", str(tmp_path / "conv"), "--prompt", "x", "--steps", "2,2", "--out", str(out)]
    )
    == 0
  )


def assert_fails(src, out, capsys, *needles):
  """The CLI exits 2 naming every needle, and leaves no trace next to --out."""
  parent = os.path.dirname(str(out))
  before = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
  assert run_cli(src, out) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for needle in needles:
    assert needle in err, err
  assert not os.path.exists(out)
  after = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
  assert after == before
  return err


def test_not_an_if_folder(tmp_path, capsys):
  out = tmp_path / "out"
  assert_fails(tmp_path / "missing", out, capsys, "does not exist")
  (tmp_path / "empty").mkdir()
  assert_fails(tmp_path / "empty", out, capsys, "model_index.json")
  src = make_src("if_stage1", str(tmp_path / "sd"), text=False)
  with open(os.path.join(src, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  assert_fails(src, out, capsys, "StableDiffusionPipeline", "not a DeepFloyd IF")
  src = make_src("if_stage1", str(tmp_path / "nounet"), text=False)
  shutil.rmtree(os.path.join(src, "unet"))
  assert_fails(src, out, capsys, "unet/config.json")


def edit_json(path, **changes):
  with open(path) as f:
    d = json.load(f)
  d.update(changes)
  with open(path, "w") as f:
    json.dump(d, f)


def test_unsupported_config_is_named(tmp_path, capsys):
  src = make_src("if_stage1", str(tmp_path / "src"), text=False)
  cfg = os.path.join(src, "unet", "config.json")
  edit_json(
    cfg,
    down_block_types=[
      "ResnetDownsampleBlock2D",
      "CrossAttnDownBlock2D",
      "SimpleCrossAttnDownBlock2D",
    ],
    up_block_types=["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    resnet_time_scale_shift="default",
  )
  assert_fails(
    src,
    tmp_path / "out",
    capsys,
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "resnet_time_scale_shift='default'",
  )
  src = make_src("if_stage1", str(tmp_path / "src2"), text=False)
  edit_json(os.path.join(src, "scheduler", "scheduler_config.json"), beta_schedule="linear")
  assert_fails(src, tmp_path / "out", capsys, "beta_schedule='linear'")


def rewrite(src, fn):
  """Applies fn to the UNet's tensors dict and saves it back (single file)."""
  unet = os.path.join(src, "unet")
  with WeightsReader(unet) as r:
    tensors = {k: r.get(k) for k in r.keys()}
    source = r.source
  fn(tensors)
  os.remove(source)
  save_file(tensors, os.path.join(unet, "diffusion_pytorch_model.safetensors"))


def test_missing_unmapped_and_misshaped_tensors(tmp_path, capsys):
  out = tmp_path / "out"
  src = make_src("if_stage2", str(tmp_path / "missing"), text=False)
  rewrite(src, lambda ts: ts.pop("mid_block.attentions.0.add_k_proj.weight"))
  assert_fails(src, out, capsys, "missing", "mid_block.attentions.0.add_k_proj.weight")
  src = make_src("if_stage2", str(tmp_path / "extra"), text=False)
  rewrite(
    src,
    lambda ts: ts.update({"down_blocks.0.attentions.0.to_q.weight": np.zeros((8, 8), np.float16)}),
  )
  assert_fails(src, out, capsys, "map to no parameter", "down_blocks.0.attentions.0.to_q.weight")
  src = make_src("if_stage2", str(tmp_path / "shape"), text=False)
  rewrite(src, lambda ts: ts.update({"conv_in.weight": np.zeros((9, 6, 3, 3), np.float16)}))
  assert_fails(src, out, capsys, "conv_in.weight", "(9, 6, 3, 3)", "(8, 6, 3, 3)")
  src = make_src("if_stage1", str(tmp_path / "bin"), text=False)
  for f in os.listdir(os.path.join(src, "unet")):
    if f.endswith(".safetensors"):
      os.rename(os.path.join(src, "unet", f), os.path.join(src, "unet", "model.bin"))
  assert_fails(src, out, capsys, "only safetensors")


def test_output_must_be_new_or_empty(tmp_path, capsys):
  src = make_src("if_stage1", str(tmp_path / "src"), text=False)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert run_cli(src, out) == 2
  assert "exists" in capsys.readouterr().err
  assert os.listdir(out) == ["keep.txt"]
  (out / "keep.txt").unlink()
  assert run_cli(src, out) == 0  # an empty directory is fine
  assert sorted(os.listdir(out)) == ["config.json", "params"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  src = make_src("if_stage1", str(tmp_path / "src"), text=False)
  real = deepfloyd_if._stream

  def failing(*args, **kwargs):
    for i, item in enumerate(real(*args, **kwargs)):
      if i == 5:
        raise OSError("disk full")
      yield item

  monkeypatch.setattr(deepfloyd_if, "_stream", failing)
  with pytest.raises(OSError, match="disk full"):
    deepfloyd_if.convert(src, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["src"]
