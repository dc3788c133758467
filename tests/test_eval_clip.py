"""CLIP towers against transformers' CLIPModel (tiny random fixture), CLIP score."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from imagen_jax import parallel
from imagen_jax.eval import clip, metrics

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_tiny")


@pytest.fixture(scope="module")
def ref():
  return np.load(os.path.join(FIXTURE, "reference.npz"))


@pytest.fixture(scope="module")
def scorer():
  return clip.CLIPScorer(FIXTURE, batch_size=4)


def test_tokenizer_matches(scorer, ref):
  ids, mask = scorer.tokenize(list(ref["prompts"]))
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_text_and_image_embeddings_match_transformers(scorer, ref):
  text = scorer.text_embeds(list(ref["prompts"]))  # incl. a truncated and an empty prompt
  np.testing.assert_allclose(text, ref["text_embeds"], atol=1e-4, rtol=0)
  model = clip.CLIP(scorer.config)
  image = model.apply(
    {"params": scorer._images.variables},  # pylint: disable=protected-access
    ref["pixel_values"],
    method=clip.CLIP.encode_image,
  )
  np.testing.assert_allclose(np.asarray(image), ref["image_embeds"], atol=1e-4, rtol=0)


def test_preprocessing_close_to_the_image_processor(scorer, ref):
  # 64px → shorter side 32 (bicubic, antialiased) → center crop 30 → normalize.
  # The processor resizes in two uint8 passes, rounding and clipping in between;
  # this resizes once in float: within ~3/255 at the images' sharp block edges.
  pixels = np.asarray(scorer.preprocess(ref["images"]))
  assert pixels.shape == ref["pixel_values"].shape == (3, 30, 30, 3)
  diff = np.abs(pixels - ref["pixel_values"]) * np.asarray(scorer.preprocess.std)
  assert diff.max() < 3.5 / 255 and diff.mean() < 0.5 / 255


def test_sharded_equals_unsharded(scorer, ref):
  mesh = parallel.make_mesh(None)
  sharded = clip.CLIPScorer(FIXTURE, mesh=mesh, batch_size=8)
  images = np.concatenate([ref["images"]] * 3)  # 9 rows: one padded chunk
  np.testing.assert_allclose(
    sharded.image_embeds(images), scorer.image_embeds(images), atol=1e-5, rtol=1e-5
  )
  np.testing.assert_allclose(
    sharded.text_embeds(list(ref["prompts"])), ref["text_embeds"], atol=1e-4, rtol=0
  )


def test_clip_score():
  a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
  b = np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
  np.testing.assert_allclose(metrics.clip_scores(a, b), [100.0, 0.0, 100 / np.sqrt(2)])


def test_scores_need_one_prompt_per_image(scorer, ref):
  scores = scorer.scores(ref["images"], list(ref["prompts"][:3]))
  assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
  with pytest.raises(ValueError, match="3 images but 2 prompts"):
    scorer.scores(ref["images"], ["a", "b"])


def test_bad_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json: no such file"):
    clip.CLIPScorer(str(tmp_path))
  bad = tmp_path / "bad"
  shutil.copytree(FIXTURE, bad)
  tensors = load_file(str(bad / "model.safetensors"))
  tensors["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((41, 32), np.float32)
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(ValueError) as e:
    clip.CLIPScorer(str(bad))
  assert "\n" not in str(e.value)
  assert "'text_model.encoder.layers.1.mlp.fc1.weight' has shape (32, 41)" in str(e.value)
  assert "expected (32, 40)" in str(e.value)
  tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
  del tensors["visual_projection.weight"]
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(ValueError, match="'visual_projection.weight' missing"):
    clip.CLIPScorer(str(bad))
