"""A word-level tokenizer fitted on a caption corpus, saved as a tokenizer folder.

The demo's frozen T5 has no pretrained vocabulary; over ByT5 bytes every word
is spread across several tokens and the encoder's first job is to reassemble
it. A word-level vocabulary fitted on the training captions gives one token per
word (``benchmarks/RESULTS.md``, demo binding table):

    fit_word_tokenizer(captions, "runs/demo/tokenizer", vocab_size=384)
    TextEncoder.random_init(..., tokenizer=_load_tokenizer("runs/demo/tokenizer"))

The folder is an ordinary ``tokenizer.json`` + ``tokenizer_config.json`` pair
(the ``tokenizers`` library's WordLevel model), so it loads through the same
``AutoTokenizer`` path as a real T5 checkpoint's tokenizer. Ids follow T5:
``<pad>`` 0, ``</s>`` 1 (appended to every caption), ``<unk>`` 2 for words never
seen in the corpus (such prompts still encode and sample).
"""

import collections
import json
import os
from typing import Iterable

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL = (PAD, EOS, UNK)


def count_words(captions: Iterable[str]) -> collections.Counter:
  """Word counts under the tokenizer's own normalization and pre-tokenization."""
  pre = _pre_tokenizer()
  norm = _normalizer()
  counts = collections.Counter()
  for caption in captions:
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8", errors="replace")
    text = norm.normalize_str(caption)
    counts.update(w for w, _ in pre.pre_tokenize_str(text))
  return counts


def _normalizer():
  from tokenizers import normalizers  # pylint: disable=g-import-not-at-top

  return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer():
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  return pre_tokenizers.Whitespace()  # words and runs of punctuation


def fit_word_tokenizer(
  captions: Iterable[str], out_dir: str, *, vocab_size: int, min_count: int = 1
) -> int:
  """Fits a word-level vocabulary on captions and saves it as a tokenizer folder.

  Args:
    captions: the corpus (str or UTF-8 bytes).
    out_dir: folder to write ``tokenizer.json`` and ``tokenizer_config.json``
      to (written to a temporary name first, then renamed).
    vocab_size: the text encoder's embedding rows; the most frequent words
      (ties by first appearance) fill them after the three special tokens.
    min_count: words seen fewer times map to ``<unk>``.

  Returns:
    The vocabulary size written (special tokens included).

  Raises:
    ValueError: an empty corpus, or vocab_size below 4.
  """
  from tokenizers import Tokenizer, models, processors  # pylint: disable=g-import-not-at-top

  if vocab_size < len(SPECIAL) + 1:
    raise ValueError(f"vocab_size must be at least {len(SPECIAL) + 1}, got {vocab_size}")
  counts = count_words(captions)
  if not counts:
    raise ValueError("cannot fit a word tokenizer: the caption corpus is empty")
  words = [w for w, n in counts.most_common() if n >= min_count]
  words = words[: vocab_size - len(SPECIAL)]
  vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(words))}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = _normalizer()
  tok.pre_tokenizer = _pre_tokenizer()
  tok.post_processor = processors.TemplateProcessing(
    single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])]
  )
  tmp = out_dir.rstrip("/") + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  tok.save(os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": 1_000_000,
        "padding_side": "right",
      },
      f,
      indent=2,
    )
  if os.path.isdir(out_dir):
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return len(vocab)
