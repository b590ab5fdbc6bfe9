"""sktlm tokenizers as Hugging Face tokenizer files, so that `AutoTokenizer.from_pretrained(folder)` encodes a
text to the same ids as sktlm (tests/test_hf.py checks it on ASCII, multi-byte UTF-8, whitespace runs).

- Byte tokenizer: a `tokenizers` BPE without merges over GPT-2's byte-to-unicode alphabet (ByteLevel, no regex
  split, no prefix space), byte b -> id b + 3, specials <pad>=0, <s>=1, </s>=2; loaded as
  PreTrainedTokenizerFast.
- SentencePiece (as trained by `sktlm tokenizer train`: identity normalisation, byte fallback, no dummy
  prefix): the SentencePiece BPE pieces and merges in a `tokenizers` BPE with byte fallback; `tokenizer.model`
  is copied beside it. Unigram models are converted by transformers' own converter.

`tokenizer(text)` prepends <s> (bos) as sktlm does at the start of every document; add_eos is off.
"""

from __future__ import annotations

import json
import os
import shutil

from sktlm.errors import UserError

PAD, BOS, EOS, UNK = '<pad>', '<s>', '</s>', '<unk>'


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map (what tokenizers' ByteLevel uses)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_tokenizer_json():
  """A `tokenizers.Tokenizer` mapping UTF-8 byte b to id b + 3 (sktlm's ByteTokenizer)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  from sktlm.data.tokenizers import BYTE_OFFSET
  vocab = {PAD: 0, BOS: 1, EOS: 2}
  vocab.update({ch: b + BYTE_OFFSET for b, ch in _bytes_to_unicode().items()})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS)])
  tok.post_processor = processors.TemplateProcessing(single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B',
                                                     special_tokens=[(BOS, 1)])
  return tok


def sentencepiece_tokenizer_json(sp_path: str):
  """A `tokenizers.Tokenizer` equal to a lossless sktlm SentencePiece BPE model (identity normaliser)."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
  proto = pb.ModelProto()
  with open(sp_path, 'rb') as f:
    proto.ParseFromString(f.read())
  ns, ts = proto.normalizer_spec, proto.trainer_spec
  if ns.name not in ('identity',) or ns.add_dummy_prefix or not ts.byte_fallback:
    raise UserError(f'{sp_path}: only SentencePiece models with identity normalisation, byte fallback and no '
                    'dummy prefix (as `sktlm tokenizer train` makes them) can be exported')
  if ts.model_type != pb.TrainerSpec.BPE:
    raise UserError(f'{sp_path}: only BPE SentencePiece models can be exported (this one is unigram)')
  sp = spm.SentencePieceProcessor(model_file=sp_path)
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  from transformers.convert_slow_tokenizer import SentencePieceExtractor
  merges = SentencePieceExtractor(sp_path).extract(models.BPE)['merges']
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True,
                             fuse_unk=True))
  tok.normalizer = normalizers.Replace(' ', '▁')
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()])
  specials = [sp.id_to_piece(i) for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  bos = sp.id_to_piece(sp.bos_id())
  tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                     special_tokens=[(bos, sp.bos_id())])
  return tok


def export(tokenizer, out: str) -> list[str]:
  """Writes tokenizer.json + tokenizer_config.json (+ tokenizer.model) for `tokenizer` into `out`."""
  if tokenizer.is_bytes:
    tok = byte_tokenizer_json()
    names = {'pad': PAD, 'bos': BOS, 'eos': EOS}
    files = []
  else:
    tok = sentencepiece_tokenizer_json(tokenizer.path)
    names = {k: tok.id_to_token(getattr(tokenizer, f'{k}_id')) for k in ('pad', 'bos', 'eos')}
    shutil.copyfile(tokenizer.path, os.path.join(out, 'tokenizer.model'))
    files = ['tokenizer.model']
  tok.save(os.path.join(out, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': names['bos'], 'eos_token': names['eos'],
            'pad_token': names['pad'], 'add_bos_token': True, 'add_eos_token': False,
            'clean_up_tokenization_spaces': False, 'model_max_length': 1 << 30,
            'split_special_tokens': True}  # literal '<s>' in a text is text, as in sktlm
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return files + ['tokenizer.json', 'tokenizer_config.json']
