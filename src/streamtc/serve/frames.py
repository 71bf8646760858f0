"""The frame codec of the server: uploaded frames decoded (JPEG, PNG or raw RGB, within the
limits) and processed frames encoded as JPEG for the web page."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .errors import LimitExceeded
from .settings import ServeLimits


def decode_frame(data: bytes, limits: ServeLimits, *, width: int | None = None, height: int | None = None) -> np.ndarray:
    """An uploaded frame as RGB uint8 [H, W, 3]: JPEG/PNG (any format PIL reads) or, with width
    and height, raw RGB bytes. Raises InputError (corrupt, wrong size) or LimitExceeded (413)."""
    if len(data) > limits.max_upload_bytes:
        raise LimitExceeded(f"frame of {len(data)} bytes exceeds the limit of {limits.max_upload_bytes} bytes "
                            "(--max-upload-bytes)", status=413)
    if (width is None) != (height is None):
        raise InputError("raw RGB frames need both width and height")
    if width is not None:
        if width < 1 or height < 1:
            raise InputError(f"width and height must be >= 1, got {width}x{height}")
        check_side(width, height, limits)
        if len(data) != width * height * 3:
            raise InputError(f"raw RGB frame of {width}x{height} needs {width * height * 3} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_side(image.width, image.height, limits)  # before decoding the pixels
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise InputError(f"cannot decode the frame ({len(data)} bytes): not an image format PIL reads "
                         "(send JPEG or PNG, or raw RGB with width and height)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot decode the frame: corrupt or truncated image ({error})") from None


def check_side(width: int, height: int, limits: ServeLimits) -> None:
    """LimitExceeded (413) for a frame wider or taller than `--max-frame-side`."""
    if max(width, height) > limits.max_frame_side:
        raise LimitExceeded(f"frame of {width}x{height} exceeds the limit of {limits.max_frame_side} pixels a side "
                            "(--max-frame-side)", status=413)


def encode_jpeg(image: np.ndarray, max_side: int = 480) -> bytes:
    """JPEG of an RGB frame, scaled down to at most `max_side` pixels a side (for the web page)."""
    picture = Image.fromarray(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


__all__ = ["check_side", "decode_frame", "encode_jpeg"]
