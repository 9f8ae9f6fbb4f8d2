"""A JPEG array-to-bytes codec for Zarr v3 tile stores (`tiling.codec: jpeg`).

Tiles of JPEG-compressed slides compress ~11x as JPEG q90 but only ~1.6x losslessly, so at cohort scale
(thousands of slides) JPEG is the practical choice. `imagecodecs-zarr` provides such codecs only for
Python >= 3.12; this is the few lines we need over `imagecodecs`. One inner chunk = one RGB tile.
A reader must import this module (dirl.store does it when the store's attrs say `images_codec: jpeg`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

NAME = "dirl.jpeg"


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Encodes a (1, T, T, 3) or (T, T, 3) uint8 chunk as one baseline JPEG."""

    level: int = 90
    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JpegCodec:
        return cls(**data.get("configuration", {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": NAME, "configuration": {"level": self.level}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        img = imagecodecs.jpeg8_decode(chunk_bytes.to_bytes())
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(img.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_ndarray_like())
        if arr.dtype != np.uint8 or arr.shape[-1] != 3:
            raise ValueError(f"JPEG codec needs uint8 RGB chunks, got {arr.dtype} {arr.shape}")
        data = imagecodecs.jpeg8_encode(arr.reshape(arr.shape[-3:]), level=self.level)
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(NAME, JpegCodec)
