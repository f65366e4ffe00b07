"""SentencePiece tokenizer: LLaMA2's `tokenizer.model` in production, tiny trained ones in tests and the demo."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeErrors/OSErrors
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        self.model_proto = model_proto

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.model here")
        return cls(path.read_bytes(), str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, **options) -> Tokenizer:
        """A small BPE model with LLaMA's special ids (unk=0, bos=1, eos=2, no pad), trained in memory."""
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=out,
            vocab_size=vocab_size,
            model_type="bpe",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,
            hard_vocab_limit=False,
            minloglevel=2,
            **options,
        )
        return cls(out.getvalue(), "<trained>")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.model"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.model_proto)
        tmp.replace(path)
        return path

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of the text each piece stands for ('▁' is a space, a byte-fallback piece is one byte, control
        and unknown pieces none): summed over a text's tokens, its length in bytes (for bits per byte)."""
        sizes = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.IsControl(i) or self.sp.IsUnknown(i):
                continue
            sizes[i] = 1 if self.sp.IsByte(i) else len(self.sp.IdToPiece(i).replace("\u2581", " ").encode())
        return sizes
