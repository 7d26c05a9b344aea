"""Optional per-array compression: zstd, and blosc lz4 with bitshuffle.

A compressed array's codec chain is ``bytes(little) -> <compressor> -> crc32c``,
exactly what zarr writes with ``compressors=[<codec>, Crc32cCodec()]``, so
plain zarr and tensorstore read it. The CRC covers the compressed bytes.

Decompression-bomb guard: before a chunk is decompressed, the size its header
declares must equal the chunk's size from ``zarr.json``, and it is decoded
into a buffer of exactly that size; a zstd frame that does not declare its
size is refused. A chunk can therefore never decode to more than its declared
size, whatever its bytes say.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numcodecs
from zarr.codecs import BloscCodec, ZstdCodec

from zarrckpt.errors import CorruptCheckpointError

__all__ = ["BloscLZ4", "Compression", "Zstd", "compression_from_metadata"]

_ZSTD_MAGIC = 0xFD2FB528
_BLOSC_HEADER = struct.Struct("<BBBBIII")  # version, versionlz, flags, typesize, nbytes, ...


class Compression(ABC):
    """A compressor applied to every chunk of an array."""

    @abstractmethod
    def zarr_codec(self, itemsize: int) -> Any:
        """The zarr codec object that describes this compressor in ``zarr.json``."""

    @abstractmethod
    def encode(self, data: memoryview, itemsize: int) -> bytes:
        """Compress one chunk's bytes."""

    @abstractmethod
    def declared_size(self, data: memoryview) -> int | None:
        """The decoded size the compressed chunk's header declares (None if it does not)."""

    @abstractmethod
    def decode_into(self, data: memoryview, out: memoryview) -> None:
        """Decompress into ``out``, whose size was checked against the header."""

    def decode_checked(self, data: memoryview, out: memoryview, where: str) -> None:
        """Decompress ``data`` into ``out`` after the bomb guard; errors name ``where``."""
        declared = self.declared_size(data)
        if declared != len(out):
            raise CorruptCheckpointError(
                f"{where}: compressed chunk declares {declared} decoded bytes, expected {len(out)}"
            )
        try:
            self.decode_into(data, out)
        except (RuntimeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: cannot decompress chunk ({exc})") from exc


@dataclass(frozen=True)
class Zstd(Compression):
    """zstd at ``level`` (1-22; 3 is a good default for checkpoints)."""

    level: int = 3

    def zarr_codec(self, itemsize: int) -> Any:
        return ZstdCodec(level=self.level, checksum=False)

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        encoded: bytes = numcodecs.Zstd(level=self.level).encode(data)
        return encoded

    def declared_size(self, data: memoryview) -> int | None:
        return zstd_frame_content_size(data)

    def decode_into(self, data: memoryview, out: memoryview) -> None:
        numcodecs.Zstd().decode(data, out=out)


@dataclass(frozen=True)
class BloscLZ4(Compression):
    """blosc with lz4; bit-shuffled by default (good for bfloat16 and float8)."""

    clevel: int = 5
    bitshuffle: bool = True

    def _codec(self, itemsize: int) -> Any:
        shuffle = numcodecs.Blosc.BITSHUFFLE if self.bitshuffle else numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname="lz4", clevel=self.clevel, shuffle=shuffle, typesize=itemsize)

    def zarr_codec(self, itemsize: int) -> Any:
        return BloscCodec(
            cname="lz4",
            clevel=self.clevel,
            shuffle="bitshuffle" if self.bitshuffle else "shuffle",
            typesize=itemsize,
            blocksize=0,
        )

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        encoded: bytes = self._codec(itemsize).encode(data)
        return encoded

    def declared_size(self, data: memoryview) -> int | None:
        if len(data) < _BLOSC_HEADER.size:
            return None
        _, _, _, _, nbytes, _, cbytes = _BLOSC_HEADER.unpack_from(data)
        return nbytes if cbytes == len(data) else None

    def decode_into(self, data: memoryview, out: memoryview) -> None:
        numcodecs.Blosc().decode(data, out=out)


def zstd_frame_content_size(data: memoryview) -> int | None:
    """The content size a single zstd frame's header declares, or None."""
    if len(data) < 6 or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        return None
    descriptor = data[4]
    size_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    dictionary_flag = descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(data) < offset + width:
        return None  # the frame does not say how large it decodes
    size = int.from_bytes(data[offset : offset + width], "little")
    return size + 256 if width == 2 else size


def compression_from_metadata(codec: dict[str, Any], where: str) -> Compression:
    """The compressor a chunk codec entry of ``zarr.json`` describes (zstd / blosc lz4)."""
    name = codec.get("name")
    config = codec.get("configuration") or {}
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{where}: codec configuration {config!r} is not a map")

    def level(field: str, default: int, lowest: int, highest: int) -> int:
        value = config.get(field, default)
        if type(value) is not int or not lowest <= value <= highest:
            raise CorruptCheckpointError(
                f"{where}: {name} {field} {value!r} is not an int from {lowest} to {highest}"
            )
        return value

    if name == "zstd" and config.get("checksum", False) is False:
        return Zstd(level=level("level", 3, -131072, 22))
    if (
        name == "blosc"
        and config.get("cname") == "lz4"
        and config.get("shuffle") in ("bitshuffle", "shuffle")
    ):
        return BloscLZ4(
            clevel=level("clevel", 5, 0, 9), bitshuffle=config["shuffle"] == "bitshuffle"
        )
    raise CorruptCheckpointError(f"{where}: unsupported compressor {codec!r}")
