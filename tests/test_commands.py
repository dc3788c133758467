"""Every command the README shows, run at tiny size on the session's fixtures.

`COMMANDS` is one table: the README command (as written, whitespace collapsed), the
module whose `main(argv)` runs it, and its tiny invocation. `{name}` in an invocation
is the value of the pytest fixture `name` (a path, or flags), computed only for the
rows that use it. A row passes when `main` returns 0 (None for benchmarks that return
their result) and the files in `expect` exist.

`test_readme_commands_are_covered` parses the README's ```bash blocks and inline
`python ...` spans and fails when a `python -m X` / `python X.py` command names a module
that no row runs and `EXEMPT` does not list, so a new README command cannot go
untested. `COVERED_BY` names the test that runs a command whose tiny run lives there
(signals, several processes, its own assertions); it must exist.
"""

import dataclasses
import importlib
import json
import os
import re
import shlex
import string

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import tiny

README = os.path.join(tiny.ROOT, "README.md")
FIXTURES = os.path.join(tiny.ROOT, "tests", "fixtures")


@dataclasses.dataclass(frozen=True)
class Command:
  """A README command and its tiny invocation."""

  readme: str  # the command as the README shows it (whitespace collapsed)
  module: str  # the module whose main(argv) runs it ("train" is train.py)
  argv: str  # the tiny invocation; {fixture} placeholders
  expect: tuple = ()  # paths (with placeholders) that must exist afterwards
  marks: tuple = ()


# fmt: off
COMMANDS = (
  # First commands. The session's `tiny_run` fixture is this command (both stages);
  # here the same command resumes it (base from step 2 to 4, sr from 1 to 2).
  Command("python train.py --config configs/demo.py --workdir runs/demo",
          "train", "--config {demo} --workdir {copy_run} {train_flags} --config.train.num_steps=4",
          ("{copy_run}/base/checkpoints/4", "{copy_run}/sr/checkpoints/2")),
  Command("python sample.py --workdir runs/demo --prompts_file configs/demo_prompts.txt",
          "sample", "--workdir {tiny_run} --prompts_file {demo_prompts} --out {tmp_path}/grid",
          ("{tmp_path}/grid/grid.png", "{tmp_path}/grid/prompts.json")),
  # The demo's scores.
  Command("python -m imagen_jax.eval.shapes --workdir runs/demo --num 100 --objects 1",
          "imagen_jax.eval.shapes",
          "--workdir {tiny_run} --num 8 --batch 8 --objects 1 --out {tmp_path}/s"),
  Command("python -m imagen_jax.eval.shapes --workdir runs/demo --num 100 # half two-object",
          "imagen_jax.eval.shapes", "--workdir {tiny_run} --num 8 --batch 8 --out {tmp_path}/s"),
  Command("python -m imagen_jax.eval.shapes --workdir runs/demo --num 50 --split holdout",
          "imagen_jax.eval.shapes",
          "--workdir {tiny_run} --num 8 --batch 8 --split holdout --out {tmp_path}/s"),
  # Evaluation (synthetic Inception weights at a 75px input, the tiny CLIP fixture).
  Command("python -m imagen_jax.eval.fid_stats --dataset shapes --data_dir data --split test",
          "imagen_jax.eval.fid_stats",
          "--dataset shapes --data_dir {shapes_data_dir} --split test --resolution 32 "
          "--builder_kwargs {shapes_kwargs} --inception {inception} --inception_resolution 75 "
          "--batch 8 --out {tmp_path}/ref.npz", ("{tmp_path}/ref.npz",)),
  Command("python -m imagen_jax.eval.fid --workdir runs/demo --reference shapes_test64.npz",
          "imagen_jax.eval.fid",
          "--workdir {tiny_run} --reference {reference} --prompts_file {demo_prompts} --num 8 "
          "--batch 8 --inception {inception} --inception_resolution 75 --clip {clip} "
          "--out {tmp_path}/fid.json", ("{tmp_path}/fid.json",)),
  Command("python -m imagen_jax.eval.sweep --workdir runs/demo --guidance 1,2,3,5,8",
          "imagen_jax.eval.sweep",
          "--workdir {tiny_run} --guidance 1,3 --metrics shapes,fid,clip --reference {reference} "
          "--inception {inception} --inception_resolution 75 --clip {clip} --num 8 --batch 8 "
          "--out {tmp_path}/sweep", ("{tmp_path}/sweep/sweep.json", "{tmp_path}/sweep/sweep.png")),
  # Training.
  Command("python train.py --config configs/demo.py --workdir runs/demo [--stage base]",
          "train", "--config {demo} --workdir {copy_run} --stage base {train_flags} "
          "--config.train.num_steps=4 --config.train.checkpoint_every=1",
          ("{copy_run}/base/checkpoints/3", "{copy_run}/base/checkpoints/4")),
  Command("python train.py --config configs/own_data.py --workdir runs/mine",
          "train", "--config {own_data} --workdir {tmp_path}/mine --stage base {train_flags} "
          "--config.data.src={captioned_images} --config.data.data_dir={tmp_path}/data",
          ("{tmp_path}/mine/base/checkpoints/2", "{tmp_path}/data/image_captions")),
  Command("python -m imagen_jax.data.prepare --dataset image_captions --data_dir data --src",
          "imagen_jax.data.prepare", "--dataset image_captions --data_dir {tmp_path}/data "
          "--src {captioned_images} --max_resolution 16", ("{tmp_path}/data/image_captions",)),
  Command("python -m imagen_jax.train.embeddings --config C",
          "imagen_jax.train.embeddings",
          "--config {demo} --config.data.data_dir={copy_shapes}", ("{copy_shapes}/embeddings",)),
  # Sampling: samplers and edits.
  Command("python sample.py --workdir runs/demo --prompt \"a red circle in the top left\"",
          "sample", "--workdir {tiny_run} --prompt 'a red circle in the top left' "
          "--prompt 'a blue square' --num_per_prompt 2 --seed 1 --guidance 3,1 "
          "--sampler ddim,ddpm --negative_prompt 'a green triangle' --out {tmp_path}/o",
          ("{tmp_path}/o/001_01.png",)),
  Command("python sample.py --workdir runs/demo --sampler dpmpp_2m,ddim --steps 10,25",
          "sample", "--workdir {tiny_run} --sampler dpmpp_2m,ddim --steps 3,2 "
          "--prompt 'a red circle in the top left' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  Command("python sample.py --workdir runs/demo --init_image in.png --strength 0.6",
          "sample", "--workdir {tiny_run} --init_image {init_png} --strength 0.6 "
          "--prompt 'a blue square in the center' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  Command("python sample.py --workdir runs/demo --init_image in.png --mask mask.png",
          "sample", "--workdir {tiny_run} --init_image {init_png} --mask {mask_png} "
          "--prompt 'a red circle in the top left' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  Command("python sample.py --workdir runs/demo --start_stage sr --lowres_image small.png",
          "sample", "--workdir {tiny_run} --start_stage sr --lowres_image {small_png} "
          "--prompt 'a yellow triangle in the center' --out {tmp_path}/o",
          ("{tmp_path}/o/grid.png",)),
  Command("python sample.py --workdir runs/demo --negative_prompt \"a red circle\"",
          "sample", "--workdir {tiny_run} --negative_prompt 'a red circle' "
          "--prompt 'a circle in the center' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  # DeepFloyd IF (the tiny parity fixtures as pipeline folders).
  Command("python -m imagen_jax.convert deepfloyd-if --src IF-I-XL-v1.0 --out if/if_I",
          "imagen_jax.convert", "deepfloyd-if --src {if_pipelines}/IF-I --out {tmp_path}/if_I "
          "--dtype bfloat16", ("{tmp_path}/if_I/config.json",)),
  Command("python -m imagen_jax.convert deepfloyd-if --src IF-II-L-v1.0 --out if/if_II",
          "imagen_jax.convert", "deepfloyd-if --src {if_pipelines}/IF-II --out {tmp_path}/if_II "
          "--lowres-resolution 8", ("{tmp_path}/if_II/config.json",)),
  Command("python sample.py --workdir if [--t5 T5_DIR] [--t5_dtype bfloat16]",
          "sample", "--workdir {if_converted} --t5 {t5} --t5_dtype bfloat16 --steps 2,2 "
          "--prompt 'a photo of a corgi' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  Command("python sample.py --workdir if/if_I,if/if_II --steps 50,25",
          "sample", "--workdir {if_converted}/if_I,{if_converted}/if_II --steps 2,2 "
          "--prompt 'a photo of a corgi' --out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  Command("python -m imagen_jax.convert deepfloyd-if --src my_finetune/unet --out if_I",
          "imagen_jax.convert", "deepfloyd-if --src {if_pipelines}/IF-I/unet "
          "--out {tmp_path}/if_I --scheduler {if_pipelines}/IF-I",
          ("{tmp_path}/if_I/config.json",)),
  Command("python -m imagen_jax.convert export-diffusers --src if_I --out if_I_unet",
          "imagen_jax.convert", "export-diffusers --src {if_converted}/if_I --out {tmp_path}/u "
          "--dtype float16", ("{tmp_path}/u/diffusion_pytorch_model.safetensors",)),
  Command("python train.py --config configs/deepfloyd_if.py:if/if_I --workdir runs/if_ft",
          "train", "--config {deepfloyd_if}:{if_converted}/if_I --workdir {tmp_path}/if_ft "
          "--config.data.src={captioned_images} --config.data.data_dir={tmp_path}/data "
          "--config.train.num_steps=1 --config.train.batch_size=8 --config.train.lr=1e-5",
          ("{tmp_path}/if_ft/if_I/checkpoints/1",)),
  Command("python sample.py --workdir runs/if_ft --prompt \"a photo of a corgi\"",
          "sample", "--workdir {if_ft_run} --steps 2 --prompt 'a photo of a corgi' "
          "--out {tmp_path}/o", ("{tmp_path}/o/grid.png",)),
  # Stable Diffusion (the tiny parity fixtures with a tiny CLIP tokenizer).
  Command("python -m imagen_jax.convert stable-diffusion --src stable-diffusion-v1-5 --out sd/sd15",
          "imagen_jax.convert", "stable-diffusion --src {sd_pipelines}/sd_v1_tiny "
          "--out {tmp_path}/sd15", ("{tmp_path}/sd15/tokenizer/tokenizer.json",)),
  Command("python -m imagen_jax.convert stable-diffusion --src stable-diffusion-x4-upscaler "
          "--out x4", "imagen_jax.convert", "stable-diffusion --src {sd_pipelines}/sd_x4_tiny "
          "--out {tmp_path}/x4", ("{tmp_path}/x4/params/unet",)),
  Command("python sample.py --workdir if/if_I,if/if_II,x4 --steps 50,25,75",
          "sample", "--workdir {if_converted}/if_I,{if_converted}/if_II,{sd_converted}/sd_x4_tiny "
          "--steps 2,2,2 --noise_level none,10,20 --prompt 'a photo of a corgi' --offload stages "
          "--out {tmp_path}/o",
          ("{tmp_path}/o/grid_x4.png",)),
  Command("python sample.py --workdir sd/sd15 --steps 50 --guidance 7.5",
          "sample", "--workdir {sd_converted}/sd_v1_tiny --steps 2 --guidance 7.5 "
          "--prompt 'a photo of a corgi' --out {tmp_path}/o", ("{tmp_path}/o/000_00.png",)),
  Command("python -m imagen_jax.convert export-diffusers --src runs/if_ft --stage if_I",
          "imagen_jax.convert", "export-diffusers --src {if_ft_run} --stage if_I "
          "--out {tmp_path}/u", ("{tmp_path}/u/config.json",)),
  Command("python train.py --config configs/stable_diffusion.py:sd/sd15 --workdir runs/sd_ft",
          "train", "--config {stable_diffusion}:{sd_converted}/sd_v1_tiny --workdir "
          "{tmp_path}/sd_ft --config.data.src={captioned_images} "
          "--config.data.data_dir={tmp_path}/data {sd_ft_flags}",
          ("{tmp_path}/sd_ft/sd/checkpoints/1",)),
  Command("python sample.py --workdir runs/sd_ft --prompt \"a photo of a corgi\"",
          "sample", "--workdir {sd_ft_run} --steps 2 --prompt 'a photo of a corgi' "
          "--out {tmp_path}/o", ("{tmp_path}/o/000_00.png",)),
  Command("python -m imagen_jax.convert export-diffusers --src runs/sd_ft --stage sd",
          "imagen_jax.convert", "export-diffusers --src {sd_ft_run} --stage sd "
          "--out {tmp_path}/p", ("{tmp_path}/p/unet/diffusion_pytorch_model.safetensors",)),
  # Models: the paper configs' parameter counts (shapes only, nothing allocated).
  Command("python -m imagen_jax.models --config configs/base64.py",
          "imagen_jax.models", "--config {configs}/base64.py"),
  Command("python -m imagen_jax.models --config configs/sr256.py",
          "imagen_jax.models", "--config {configs}/sr256.py"),
  Command("python -m imagen_jax.models --config configs/sr1024.py",
          "imagen_jax.models", "--config {configs}/sr1024.py"),
  # Benchmarks, on the tiny demo (one strategy, accumulation or remat value each: a compile
  # per value; the lists themselves are parsed by tests/test_benchmarks_sharding.py).
  Command("python -m benchmarks.sharding --config configs/demo.py --stage base --devices 8 "
          "--strategies dp,fsdp,tp,fsdp_tp", "benchmarks.sharding",
          "--config {demo} {model_flags} --stage base --devices 8 --strategies fsdp_tp "
          "--steps 1 --warmup 0 --json {tmp_path}/s.json", ("{tmp_path}/s.json",)),
  Command("python -m benchmarks.sharding --config configs/demo.py --stage base --devices 8 "
          "--strategies fsdp --grad_accum 1,2,4", "benchmarks.sharding",
          "--config {demo} {model_flags} --stage base --devices 8 --strategies fsdp "
          "--batch 16 --grad_accum 2 --steps 1 --warmup 0"),
  Command("python -m benchmarks.sharding --config configs/demo.py --stage base --devices 1 "
          "--strategies dp --remat", "benchmarks.sharding",
          "--config {demo} {model_flags} --stage base --devices 1 --strategies dp "
          "--remat full --steps 1 --warmup 0"),
  Command("python -m benchmarks.train_loop --config configs/demo.py --stage base",
          "benchmarks.train_loop", "--config {demo} {model_flags} "
          "--config.data.data_dir={shapes_data_dir} --stage base --steps 2 "
          "--json {tmp_path}/t.json",
          ("{tmp_path}/t.json",)),
  Command("python -m benchmarks.sampling --config configs/demo.py --steps 25,50,100,200",
          "benchmarks.sampling", "--config {demo} --steps 2,3 --batch 8 --json {tmp_path}/s.json",
          ("{tmp_path}/s.json",)),
  Command("python -m benchmarks.kernels --only attention --no-torch",
          "benchmarks.kernels", "--only attention --no-torch --repeats 1"),
  Command("python -m benchmarks.if_sampling --width 64 --batch 4 --steps 25",
          "benchmarks.if_sampling", "--width 32 --batch 1 --steps 2 --repeats 1"),
  Command("python -m benchmarks.input_pipeline --config configs/own_data.py",
          "benchmarks.input_pipeline", "--config {own_data} --examples 8 --workers 2 --steps 0 "
          "--json {tmp_path}/ip.json", ("{tmp_path}/ip.json",)),
  # Streamed corpora (a tiny webdataset written by tests/corpus_testdata.py).
  Command("python -m imagen_jax.data.inspect --config configs/own_data.py:webdataset",
          "imagen_jax.data.inspect", "--config {own_data_wds} --config.data.src={wds_shards} "
          "--num all --grid {tmp_path}/g.png --json {tmp_path}/i.json",
          ("{tmp_path}/g.png", "{tmp_path}/i.json")),
  Command("python -m imagen_jax.data.prepare --dataset webdataset --src",
          "imagen_jax.data.prepare", "--dataset webdataset --src {wds_shards} "
          "--data_dir {tmp_path}/data --max_resolution 16", ("{tmp_path}/data/corpus_shards",)),
)
# fmt: on

# README commands whose tiny run is another test's (it asserts more than an exit code).
COVERED_BY = {
  "benchmarks.demo_binding": "tests/test_benchmarks_binding.py::test_trains_scores_and_rescores",
  "benchmarks.binding_probe": "tests/test_benchmarks_binding.py::test_binding_probe_labels_and_run",
  # The README's two-process loop (train.py with --coordinator_address ...).
  "train.py --coordinator_address": "tests/test_multiprocess.py::"
  "test_two_processes_train_as_one_stop_together_and_resume_elastically",
  # Profiles an IF-shaped UNet at width >= 32 (its group norm): several minutes of compiling
  # on 2 cores; its pieces (op kinds, per-op time, the kernel table) are tested there.
  "benchmarks.op_profile": "tests/test_benchmarks_profile.py::"
  "test_profile_attributes_time_to_the_ops",
  # Beam preparation with --embed (the DirectRunner on 2 workers, embeddings compared).
  "imagen_jax.train.prepare": "tests/test_beam_prepare.py::"
  "test_beam_embeddings_equal_the_in_process_ones",
}

# README commands that are not run here, and why.
EXEMPT = {
  "pytest": "the test suite itself",
  "venv": "creates the peers venv",
  "benchmarks.peers": "needs the peers venv (PyTorch, diffusers, imagen-pytorch)",
  "tools/make_inception_fixtures.py": "needs PyTorch (tools/requirements.txt)",
  "tools/check_export_roundtrip.py": "needs PyTorch and diffusers (tools/requirements.txt)",
}


def _code(text: str) -> tuple[list[str], str]:
  """(the ```bash / ```sh / bare ``` blocks, the prose with every block removed)."""
  blocks, prose, lang = [], [], None
  for line in text.splitlines(keepends=True):
    if line.startswith("```"):
      if lang is None:
        lang = line[3:].strip()
        if lang in ("bash", "sh", ""):
          blocks.append("")
      else:
        lang = None
    elif lang is None:
      prose.append(line)
    elif lang in ("bash", "sh", ""):
      blocks[-1] += line
  return blocks, "".join(prose)


def readme_commands(text: str) -> list[str]:
  """The `python ...` commands of shell blocks and inline code spans, one line each."""
  blocks, prose = _code(text)
  spans = re.findall(r"`([^`]*python[^`]*)`", prose)
  commands = []
  for chunk in blocks + spans:
    chunk = chunk.replace("\\\n", " ")
    for line in chunk.splitlines():
      for m in re.finditer(r"(?:^|[\s/\"(])python3?\s+(-m\s+)?[\w./-]+.*?(?=&&|;|$)", line):
        commands.append(" ".join(m.group(0).strip(' "(/').split()))
  return commands


def module_of(command: str) -> str:
  """`python -m X ...` -> X; `python path/X.py ...` -> path/X.py."""
  words = command.split()
  return words[2] if words[1] == "-m" else words[1]


def _normalized(text: str) -> str:
  return " ".join(text.replace("\\\n", " ").split())


def test_readme_parser_finds_blocks_and_inline_commands():
  text = (
    "Run `python -m a.b --x 1\n--y` or:\n```bash\npython c.py --z \\\n  2 && python -m d\n"
    "for i in 0 1; do\n  X=1 python train.py --n $i &\ndone\n../v/bin/python -m e.f\n```\n"
    "```python\nimport x  # python -m not.this\n```\n```\npython -m g --config h\n```\n"
  )
  got = readme_commands(text)
  assert [module_of(c) for c in got] == ["c.py", "d", "train.py", "e.f", "g", "a.b"], got
  assert got[0] == "python c.py --z 2"


def test_readme_commands_are_covered():
  commands = readme_commands(open(README, encoding="utf-8").read())
  assert len(commands) > 30, commands  # the parser still finds the README's commands
  covered = {c.module for c in COMMANDS} | {k.split()[0] for k in COVERED_BY} | set(EXEMPT)
  covered |= {"train.py" if m == "train" else "sample.py" if m == "sample" else m for m in covered}
  missing = sorted({module_of(c) for c in commands} - covered)
  assert not missing, f"README commands that tests/test_commands.py does not run: {missing}"


def test_rows_name_readme_commands():
  """Each row's README command is still in the README (else the row tests something else)."""
  text = _normalized(open(README, encoding="utf-8").read())
  stale = [c.readme for c in COMMANDS if c.readme.split(" #")[0] not in text]
  assert not stale, stale
  for key, node in COVERED_BY.items():
    path, name = node.split("::")
    assert f"def {name}(" in open(os.path.join(tiny.ROOT, path)).read(), node
    assert key.split()[0] in text


# Fixtures the invocations name --------------------------------------------------------


@pytest.fixture
def demo():
  return tiny.DEMO_TINY


@pytest.fixture
def own_data():
  return os.path.join(tiny.ROOT, "configs/own_data.py:tiny")


@pytest.fixture
def own_data_wds():
  return os.path.join(tiny.ROOT, "configs/own_data.py:webdataset,tiny")


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory):
  """A brace pattern over a tiny webdataset corpus (good and damaged records)."""
  import corpus_testdata  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("wds")
  corpus_testdata.make_webdataset(str(root), num_shards=2, per_shard=3)
  return f"{root}/{{00000..00001}}.tar"


@pytest.fixture
def deepfloyd_if():
  return os.path.join(tiny.ROOT, "configs/deepfloyd_if.py")


@pytest.fixture
def configs():
  return os.path.join(tiny.ROOT, "configs")


@pytest.fixture
def demo_prompts():
  return os.path.join(tiny.ROOT, "configs/demo_prompts.txt")


@pytest.fixture
def model_flags():
  return shlex.join(tiny.MODEL_FLAGS)


@pytest.fixture
def train_flags(shapes_data_dir):
  """The session tiny run's flags (its data, model, steps), for commands that train."""
  import conftest  # pylint: disable=import-outside-toplevel

  return shlex.join([f"--config.data.data_dir={shapes_data_dir}", *conftest.TINY_RUN_FLAGS])


@pytest.fixture
def shapes_kwargs():
  return shlex.quote(json.dumps(tiny.SHAPES_KWARGS))


@pytest.fixture
def clip():
  return os.path.join(FIXTURES, "clip_tiny")


@pytest.fixture
def t5():
  return os.path.join(FIXTURES, "t5_v1_1")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  """Synthetic FID InceptionV3 weights (pytorch-fid's names and shapes)."""
  from imagen_jax.eval import inception as inception_lib  # pylint: disable=import-outside-toplevel

  path = str(tmp_path_factory.mktemp("inception") / "inception.safetensors")
  save_file(inception_lib.synthetic_state_dict(0), path)
  return path


@pytest.fixture(scope="module")
def reference(inception, tmp_path_factory):
  """FID reference statistics of 12 shapes images, for 32px samples (the tiny run's)."""
  from imagen_jax.data import shapes  # pylint: disable=import-outside-toplevel
  from imagen_jax.eval import fid_stats  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("reference")
  for i in range(12):
    Image.fromarray(shapes.sample_scene((7, 0, i), 32)[0]).save(root / f"{i:02d}.png")
  out = str(root / "ref.npz")
  argv = ["--folder", str(root), "--resolution", "32", "--inception", inception]
  assert fid_stats.main(argv + ["--inception_resolution", "75", "--batch", "8", "--out", out]) == 0
  return out


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory):
  """Your own data: sixteen 40px PNGs with same-stem .txt captions (two batches of 8)."""
  root = tmp_path_factory.mktemp("my_images")
  rng = np.random.default_rng(0)
  for i in range(16):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / f"{i}.txt").write_text(f"picture number {i}\n")
  return root


@pytest.fixture(scope="module")
def edit_images(tmp_path_factory):
  """in.png (32px), mask.png (white: repaint the bottom right), small.png (16px)."""
  root = tmp_path_factory.mktemp("edit")
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "in.png")
  mask = np.zeros((32, 32), np.uint8)
  mask[16:, 16:] = 255
  Image.fromarray(mask).save(root / "mask.png")
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "small.png")
  return root


@pytest.fixture
def init_png(edit_images):
  return edit_images / "in.png"


@pytest.fixture
def mask_png(edit_images):
  return edit_images / "mask.png"


@pytest.fixture
def small_png(edit_images):
  return edit_images / "small.png"


@pytest.fixture(scope="module")
def sd_pipelines(tmp_path_factory):
  """The tiny SD fixtures as pipeline folders with the tiny CLIP tokenizer."""
  root = tmp_path_factory.mktemp("sd_src")
  for name in ("sd_v1_tiny", "sd_x4_tiny"):
    tiny.sd_pipeline(name, root / name)
  return root


@pytest.fixture(scope="module")
def if_ft_run(if_converted, captioned_images, tmp_path_factory):
  """if_I fine-tuned one step by train.py (the README's fine-tuning command)."""
  import train  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("if_ft")
  argv = ["--config", os.path.join(tiny.ROOT, f"configs/deepfloyd_if.py:{if_converted}/if_I")]
  argv += ["--workdir", str(root / "run"), f"--config.data.src={captioned_images}"]
  argv += [f"--config.data.data_dir={root / 'data'}", "--config.train.num_steps=1"]
  assert train.main(argv + ["--config.train.batch_size=8"]) == 0
  return root / "run"


@pytest.fixture
def stable_diffusion():
  return os.path.join(tiny.ROOT, "configs/stable_diffusion.py")


@pytest.fixture
def sd_ft_flags():
  return " ".join(tiny.SD_FINETUNE_FLAGS)


@pytest.fixture(scope="module")
def sd_ft_run(sd_converted, captioned_images, tmp_path_factory):
  """sd_v1_tiny fine-tuned one step by train.py (the README's fine-tuning command)."""
  import train  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("sd_ft")
  folder = sd_converted / "sd_v1_tiny"
  argv = ["--config", os.path.join(tiny.ROOT, f"configs/stable_diffusion.py:{folder}")]
  argv += ["--workdir", str(root / "run"), f"--config.data.src={captioned_images}"]
  argv += [f"--config.data.data_dir={root / 'data'}", *tiny.SD_FINETUNE_FLAGS]
  assert train.main(argv) == 0
  return root / "run"


# The commands -------------------------------------------------------------------------


def _expand(template: str, request) -> str:
  names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
  return template.format(**{n: request.getfixturevalue(n) for n in names})


def _main(module: str):
  """The module's main(argv): its own, or its __main__'s (a package run with -m)."""
  mod = importlib.import_module(module)
  return mod if hasattr(mod, "main") else importlib.import_module(module + ".__main__")


@pytest.mark.slow
@pytest.mark.parametrize("command", [pytest.param(c, id=c.readme, marks=c.marks) for c in COMMANDS])
def test_readme_command(command, request, capsys):
  argv = shlex.split(_expand(command.argv, request))
  rc = _main(command.module).main(argv)
  out = capsys.readouterr()
  assert rc in (0, None) or isinstance(rc, dict), (rc, out.err[-2000:])
  for path in command.expect:
    assert os.path.exists(_expand(path, request)), (path, out.out[-1000:], out.err[-1000:])


def test_first_command_trained_every_stage(tiny_run):
  """The session fixture is the README's first command: both stages trained and saved."""
  for stage, steps in (("base", 2), ("sr", 1)):
    assert os.path.isdir(tiny_run / stage / "checkpoints" / str(steps)), stage
    lines = (tiny_run / stage / "metrics.jsonl").read_text().splitlines()
    assert lines and all(np.isfinite(json.loads(x)["loss"]) for x in lines)
