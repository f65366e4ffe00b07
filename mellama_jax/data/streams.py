"""Inputs as byte streams: plain files, gzip, zstd, and the members of a zip, decoded a chunk at a time.

Memory stays bounded whatever the file size: a compressed chunk's worth of text plus one line (or one zip
member) at a time. A stream that is cut short or corrupt (a `.gz`/`.zst` whose download stopped, a zip member
whose CRC fails) ends that input with one counted report naming the file and the line it stopped at; the
lines before it are kept.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

CHUNK = 1 << 16  # compressed bytes fed to the zstd decoder at a time (text decodes to ~4x that)
COMPRESSED = (".gz", ".zst", ".zstd")


class StreamError(EOFError):
    """A compressed stream that ends inside a frame or cannot be decoded."""


class ArchiveError(ValueError):
    """A zip that cannot be opened at all (exit code 2, one line naming it)."""


class _ZstdRaw(io.RawIOBase):
    """zstd frames one after another (as `zstd` and the Pile write them). zstandard's own stream_reader ends
    silently where the input is cut, so we drive the decoder ourselves and notice an unfinished frame."""

    def __init__(self, f):
        self.f, self.ctx = f, zstandard.ZstdDecompressor()
        self.decoder, self.in_frame = self.ctx.decompressobj(), False
        self.out, self.pos, self.error = b"", 0, zstandard.ZstdError

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        parts = []
        while data:
            try:
                parts.append(self.decoder.decompress(data))
            except self.error as e:
                raise StreamError(f"corrupt zstd data ({e})") from None
            self.in_frame = not self.decoder.eof
            data = self.decoder.unused_data if self.decoder.eof else b""
            if self.decoder.eof:  # a decompressobj decodes exactly one frame
                self.decoder = self.ctx.decompressobj()
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        while self.pos == len(self.out):
            data = self.f.read(CHUNK)
            if not data:
                if self.in_frame:
                    raise StreamError("truncated zstd stream (the input ends inside a frame)")
                return 0
            self.out, self.pos = self._feed(data), 0
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


STREAM_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zipfile.BadZipFile)  # StreamError is an EOFError


def compression(path: str | Path) -> str:
    """The compression suffix of a file name ('' if none)."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSED else ""


def data_suffix(path: str | Path) -> str:
    """The format suffix under any compression: 'a.jsonl.zst' -> '.jsonl'."""
    path = Path(path)
    if compression(path):
        path = path.with_suffix("")
    return path.suffix.lower()


def open_bytes(path: str | Path) -> io.BufferedIOBase:
    """A file as a binary stream, decompressed by its suffix (.gz, .zst/.zstd)."""
    kind = compression(path)
    if kind == ".gz":
        return gzip.open(path, "rb")
    if kind:
        return io.BufferedReader(_ZstdRaw(open(path, "rb")), CHUNK)
    return open(path, "rb")


def open_zip(path: str | Path) -> zipfile.ZipFile:
    """A zip archive; one cut short (no central directory at its end) is an error naming the file."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{path}: truncated or not a zip archive ({e})") from None


def numbered_lines(stream, name: str, report) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary stream; undecodable lines and a broken stream are reported."""
    number, offset = 0, 0
    try:
        for number, raw in enumerate(stream, start=1):
            offset += len(raw)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.skip(f"{name}:{number}", f"invalid UTF-8: {e.reason} at byte {e.start}")
    except STREAM_ERRORS as e:
        report.skip(
            f"{name}:{number + 1}",
            f"truncated stream: the input ends or breaks after line {number} "
            f"(byte {offset} of its text); the rest of this file is lost ({e})",
        )


def read_member(archive: zipfile.ZipFile, member: str, name: str, report) -> str | None:
    """One zip member's text, or None (reported) if it is corrupt or not UTF-8."""
    try:
        data = archive.read(member)
    except STREAM_ERRORS as e:
        report.skip(name, f"truncated stream: {e}")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(name, f"invalid UTF-8: {e.reason} at byte {e.start}")
        return None
