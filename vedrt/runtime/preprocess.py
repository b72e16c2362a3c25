"""Images in, pixel values out: the checkpoint's image processor, in numpy and PIL.

Reproduces transformers' (slow, PIL-based) ViTImageProcessor, DeiTImageProcessor,
BeitImageProcessor, DonutImageProcessor and NougatImageProcessor from `preprocessor_config.json`
step for step (PIL
resize on uint8, crop or pad, rescale in float64 then float32, normalize in float32), so the
pixel values match theirs and the runtime needs no transformers.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

BILINEAR, BICUBIC = 2, 3
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
# Per-class defaults, used only for keys a preprocessor_config.json leaves out.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {"size": {"height": 224, "width": 224}, "resample": BILINEAR},
    "DeiTImageProcessor": {
        "size": {"height": 256, "width": 256},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": (0.485, 0.456, 0.406),
        "image_std": (0.229, 0.224, 0.225),
    },
    "BeitImageProcessor": {
        "size": {"height": 256, "width": 256},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "DonutImageProcessor": {
        "size": {"height": 2560, "width": 1920},
        "resample": BILINEAR,
        "do_thumbnail": True,
        "do_pad": True,
    },
    "NougatImageProcessor": {  # Donut's geometry after cropping the page's margins
        "size": {"height": 896, "width": 672},
        "resample": BILINEAR,
        "do_crop_margin": True,
        "do_thumbnail": True,
        "do_pad": True,
        "image_mean": (0.485, 0.456, 0.406),
        "image_std": (0.229, 0.224, 0.225),
    },
}
DONUT_LIKE = ("DonutImageProcessor", "NougatImageProcessor")


@dataclass(frozen=True)
class ImageProcessor:
    """The steps of one checkpoint's image processor, with their parameters."""

    kind: str  # "vit" (ViT/DeiT/BEiT: resize, optional center crop) or "donut"
    size: dict[str, int]
    resample: int
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD
    image_std: tuple[float, ...] = IMAGENET_STANDARD
    do_thumbnail: bool = False
    do_align_long_axis: bool = False
    do_pad: bool = False
    do_crop_margin: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessor:
        name = _class_name(config)
        c = dict(CLASS_DEFAULTS[name])
        c.update({k: v for k, v in config.items() if v is not None})
        donut = name in DONUT_LIKE
        size = c["size"]
        if donut and isinstance(size, list | tuple):
            size = list(size)[::-1]  # Donut's legacy (width, height) order
        return cls(
            kind="donut" if donut else "vit",
            size=_size_dict(size),
            resample=int(c["resample"]),
            do_resize=bool(c.get("do_resize", True)),
            do_center_crop=bool(c.get("do_center_crop", False)),
            crop_size=_size_dict(c["crop_size"]) if c.get("crop_size") is not None else None,
            do_rescale=bool(c.get("do_rescale", True)),
            rescale_factor=float(c.get("rescale_factor", 1 / 255)),
            do_normalize=bool(c.get("do_normalize", True)),
            image_mean=_triple(c.get("image_mean", IMAGENET_STANDARD)),
            image_std=_triple(c.get("image_std", IMAGENET_STANDARD)),
            do_thumbnail=donut and bool(c.get("do_thumbnail", True)),
            do_align_long_axis=donut and bool(c.get("do_align_long_axis", False)),
            do_pad=donut and bool(c.get("do_pad", True)),
            do_crop_margin=donut and bool(c.get("do_crop_margin", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessor:
        try:
            return cls.from_config(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InputError(
                f"{path}: missing (the export has no image processor config)"
            ) from None
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: corrupt image processor config ({exc})") from None

    @property
    def keep_short_side(self) -> int | None:
        """The short side a huge image may be reduced to before this processor resizes it."""
        if not self.do_resize:
            return None
        h, w = self.size.get("height"), self.size.get("width")
        if h is None or w is None:
            return REDUCE_MARGIN * int(self.size.get("shortest_edge", 0)) or None
        return REDUCE_MARGIN * (max(h, w) if self.kind == "vit" else min(h, w))

    def __call__(self, images: list[Any]) -> np.ndarray:
        """PIL images -> pixel values `[batch, 3, height, width]` float32."""
        return np.stack([self.one(_rgb_or_input_error(image, i)) for i, image in enumerate(images)])

    def one(self, image) -> np.ndarray:
        array = np.asarray(image, dtype=np.uint8)
        if self.kind == "donut":
            array = self._donut_geometry(array)
        else:
            if self.do_resize:
                array = pil_resize(array, output_size(array, self.size), self.resample)
            if self.do_center_crop and self.crop_size is not None:
                array = center_crop(array, (self.crop_size["height"], self.crop_size["width"]))
        # channels first before the arithmetic: the same element-wise values, but the mean and
        # std broadcast over rows of pixels instead of over 3-value pixels (43 -> 9 us at 64 x 64)
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
        x = array.astype(np.float32)
        if self.do_rescale:
            x = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32).reshape(-1, 1, 1)
            x = (x - mean) / np.asarray(self.image_std, np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _donut_geometry(self, array: np.ndarray) -> np.ndarray:
        h, w = self.size["height"], self.size["width"]
        if self.do_crop_margin:
            array = crop_margin(array)
        if self.do_align_long_axis:
            ih, iw = array.shape[:2]
            if (w < h and iw > ih) or (w > h and iw < ih):
                array = np.rot90(array, 3, axes=(0, 1))
        if self.do_resize:
            array = pil_resize(
                array, output_size(array, {"shortest_edge": min(h, w)}), self.resample
            )
        if self.do_thumbnail:
            array = thumbnail(array, (h, w))
        if self.do_pad:
            dh, dw = h - array.shape[0], w - array.shape[1]
            top, left = dh // 2, dw // 2
            array = np.pad(array, ((top, dh - top), (left, dw - left), (0, 0)))
        return array


def _class_name(config: dict[str, Any]) -> str:
    """The processor class a config names (ViT's when it names none); one clear error for a class
    whose steps are not reproduced here, rather than pixel values from the wrong steps."""
    name = config.get("image_processor_type") or config.get("feature_extractor_type")
    name = str(name or "ViTImageProcessor").removesuffix("Fast")
    name = name.replace("FeatureExtractor", "ImageProcessor")
    if name not in CLASS_DEFAULTS:
        raise InputError(
            f"image processor {name!r} is not supported (supported: {', '.join(CLASS_DEFAULTS)}); "
            "pass pixel values from the checkpoint's own processor instead"
        )
    return name


def _size_dict(size: Any) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and ({"height", "width"} <= size.keys() or "shortest_edge" in size):
        return {k: int(v) for k, v in size.items()}
    raise ValueError(f"unsupported size {size!r}")


def _triple(value: Any) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def output_size(array: np.ndarray, size: dict[str, int]) -> tuple[int, int]:
    """(height, width) after resizing; transformers' get_resize_output_image_size for shortest_edge."""
    if "height" in size:
        return size["height"], size["width"]
    height, width = array.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def pil_resize(
    array: np.ndarray, size: tuple[int, int], resample: int, reducing_gap: float | None = None
) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(array)
    return np.asarray(
        image.resize((size[1], size[0]), resample=resample, reducing_gap=reducing_gap)
    )


def thumbnail(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """DonutImageProcessor.thumbnail: shrink to fit, keeping the aspect ratio."""
    ih, iw = array.shape[:2]
    height, width = min(ih, size[0]), min(iw, size[1])
    if height == ih and width == iw:
        return array
    if ih > iw:
        width = int(iw * height / ih)
    elif iw > ih:
        height = int(ih * width / iw)
    return pil_resize(array, (height, width), BICUBIC, reducing_gap=2.0)


def crop_margin(array: np.ndarray, gray_threshold: int = 200) -> np.ndarray:
    """NougatImageProcessor.crop_margin: crop to the bounding box of the page's darker pixels
    (below `gray_threshold` once the grey levels are stretched to 0..255)."""
    from PIL import Image

    gray = np.asarray(Image.fromarray(array).convert("L")).astype(np.uint8)
    low, high = gray.min(), gray.max()
    if low == high:
        return array
    dark = (gray - low) / (high - low) * 255 < gray_threshold
    rows, cols = np.nonzero(dark)
    return array[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop on `[H, W, C]`, zero-padding an image smaller than the crop."""
    h, w = array.shape[:2]
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return array[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, array.shape[2]), dtype=array.dtype)
    pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[pt : pt + h, pl : pl + w] = array
    top, left = top + pt, left + pl
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold: larger is refused as a likely bomb
LARGE_PIXELS = 4096 * 4096  # above this, decode reduced (where the processor shrinks anyway)
REDUCE_MARGIN = 4  # a reduced image keeps at least 4x the pixels the processor resizes to


def to_rgb(image):
    """Any PIL mode -> RGB the way transformers' convert_to_rgb does, 16-bit included.

    8-bit modes (L, P, RGBA, CMYK ...) go through PIL's convert, as transformers' do (alpha
    dropped). 16-bit grayscale (I;16*, and I with values above 255) is scaled to 8 bits first
    (value / 257, rounded): PIL's convert clips it, which turns an ordinary 16-bit scan white.
    """
    if image.mode == "RGB":
        return image
    from PIL import Image

    if image.mode in SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode in SIXTEEN_BIT or values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) / 257.0
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return gray.convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about palette transparency
        return image.convert("RGB")


def _rgb_or_input_error(image, index: int):
    try:
        return to_rgb(image)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"image {index}: cannot convert mode {image.mode} to RGB ({exc})"
        ) from None


def _upright(image):
    """Apply the EXIF orientation tag, as transformers' load_image does (a copy either way)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):  # corrupt EXIF: as stored
        return image.copy()


def _open_bounded(image, name: str, max_pixels: int, keep_short_side: int | None):
    """Decode an opened file with at most `max_pixels`, reduced when very large and resized anyway."""
    width, height = image.size
    reducible = keep_short_side is not None and width * height > LARGE_PIXELS
    if reducible and image.format == "JPEG":
        image.draft(None, (keep_short_side, keep_short_side))  # DCT scaling, never below that
    if image.size[0] * image.size[1] > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} pixels is more than the limit of {max_pixels:,} "
            "(a decompression bomb, or too large to caption)"
        )
    image.load()  # decode now: a truncated file fails here, not later
    if reducible:
        factor = min(image.size) // keep_short_side
        if factor >= 2:
            return image.reduce(factor)
    return image


def _opener(source: Any) -> tuple[Any, str]:
    """What `Image.open` reads for a path, bytes or a binary file object, and the name errors use."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), "image bytes"
    if hasattr(source, "read"):
        return source, str(getattr(source, "name", "image stream"))
    if isinstance(source, str | os.PathLike):
        return Path(source), str(source)
    raise InputError(
        f"cannot read an image from a {type(source).__name__}: pass a path, encoded image bytes, "
        "a binary file object or a PIL image (pixel arrays go to generate() directly)"
    )


def load_image(source: Any, *, max_pixels: int = MAX_PIXELS, keep_short_side: int | None = None):
    """A path, encoded image bytes, a binary file object or a PIL image -> a decoded,
    EXIF-upright PIL image, or one clear InputError.

    Files over `max_pixels` are refused before decoding. `keep_short_side` (from
    `ImageProcessor.keep_short_side`) lets an image over LARGE_PIXELS be decoded reduced, keeping
    at least that short side, so a huge photo costs its reduced size in memory, not its full one.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return _upright(source)
    path, name = _opener(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _upright(_open_bounded(image, name, max_pixels, keep_short_side))
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(
            f"{name}: more pixels than the limit of {max_pixels:,} (a decompression bomb?)"
        ) from None
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (unrecognised format or truncated file)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: unreadable or truncated image ({exc})") from None
    except MemoryError:
        raise InputError(f"{name}: not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001  (a decoder's own failure on a malformed file)
        # Pillow's plugins raise more than OSError on crafted input (NotImplementedError from a
        # mutated DDS, struct.error, IndexError...): still this one image's error, never a crash
        raise InputError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from None
