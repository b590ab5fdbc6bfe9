"""Tokenizers: raw UTF-8 bytes, or a SentencePiece .model (loaded, or trained on a corpus).

Byte tokenizer id layout (vocab_size 259, the model pads it to a multiple of 128):
  0 = pad, 1 = bos, 2 = eos, 3 + b = byte b (0..255).
SentencePiece models trained here use the same specials: pad 0, bos 1, eos 2, unk 3, with identity
normalisation, byte fallback and no dummy prefix, so decode(encode(text)) == text for any text.

Every document is packed as [bos] + encode(text) + [eos].
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

from sktlm.errors import UserError

BYTE_OFFSET = 3


class ByteTokenizer:
  """UTF-8 bytes shifted by 3 (ids 0..2 are pad/bos/eos)."""

  is_bytes = True
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 256 + BYTE_OFFSET
  fingerprint = 'bytes'

  def encode(self, text: str | bytes) -> list[int]:
    return self.encode_np(text).tolist()

  def encode_np(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET

  def num_tokens(self, text: str | bytes) -> int:
    return len(text.encode('utf-8')) if isinstance(text, str) else len(text)

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).ravel()
    ids = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
    return bytes(ids.astype(np.uint8)).decode('utf-8', errors='replace')

  def __repr__(self):
    return 'ByteTokenizer(vocab_size=259)'


class SentencePieceTokenizer:
  """A SentencePiece .model; picklable (grain worker processes rebuild the processor from its bytes)."""

  is_bytes = False

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise UserError(f'tokenizer file not found: {path} (train one with `sktlm tokenizer train '
                      f'--config=... --vocab_size=8192 --out={path}`, or use --config.data.tokenizer=bytes)')
    with open(path, 'rb') as f:
      self._proto = f.read()
    self.path = path
    self.fingerprint = hashlib.sha256(self._proto).hexdigest()
    self._load()

  def _load(self):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except (RuntimeError, OSError) as e:
      raise UserError(f'not a valid SentencePiece model: {self.path} ({e})') from e
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise UserError(f'SentencePiece model {self.path} has no bos/eos pieces (train it with bos_id/eos_id '
                      'set, e.g. with `sktlm tokenizer train`)')
    # Padding is always masked out (weight 0, segment 0), so any id will do when the model has none.
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_sp'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return self._sp.encode(text)

  def encode_np(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    texts = [t.decode('utf-8', errors='replace') if isinstance(t, bytes) else t for t in texts]
    return self._sp.encode(texts)

  def num_tokens(self, text: str | bytes) -> int:
    return len(self.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in (ids.ravel() if isinstance(ids, np.ndarray) else ids)]
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([i for i in ids if i not in specials])

  def __repr__(self):
    return f'SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})'


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def get_tokenizer(spec: str) -> Tokenizer:
  """'bytes' or a path to a SentencePiece .model."""
  if not spec or spec == 'bytes':
    return ByteTokenizer()
  return SentencePieceTokenizer(os.path.expanduser(spec))


def _training_sentences(texts: Iterable[bytes | str], max_bytes: int) -> Iterable[str]:
  """Cuts documents into pieces of whole lines (newlines kept) no longer than max_bytes."""
  for text in texts:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
      n = len(line.encode('utf-8'))
      if chunk and size + n > max_bytes:
        yield ''.join(chunk)
        chunk, size = [], 0
      if n > max_bytes:  # one very long line: hard cut
        line = line.encode('utf-8')[:max_bytes].decode('utf-8', errors='ignore')
        n = len(line.encode('utf-8'))
      chunk.append(line)
      size += n
    if chunk:
      yield ''.join(chunk)


def train_sentencepiece(texts: Iterable[bytes | str], out: str, vocab_size: int,
                        model_type: str = 'bpe', max_sentences: int = 2_000_000,
                        num_threads: int | None = None) -> SentencePieceTokenizer:
  """Trains a lossless SentencePiece model on documents and writes it to `out` (a .model file)."""
  import sentencepiece as spm
  if vocab_size < 300:
    raise UserError(f'--vocab_size={vocab_size} is too small for a SentencePiece model (use >= 300)')
  out = os.path.expanduser(out)
  if not out.endswith('.model'):
    raise UserError(f'--out must end with .model (got {out})')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  max_bytes = 4096
  sentences = _training_sentences(texts, max_bytes)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=out[:-len('.model')], vocab_size=vocab_size,
        model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9995, max_sentence_length=max_bytes + 16, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, train_extremely_large_corpus=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f'SentencePiece training failed: {" ".join(str(e).split())}') from e
  return SentencePieceTokenizer(out)
