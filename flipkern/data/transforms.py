"""Image preprocessing with PIL + numpy (no torchvision): resize the shorter side
to ``image_size`` (bicubic), center crop to a square, scale to [0, 1] and
normalize with the CLIP mean/std, as open_clip's eval transform does."""
import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(CLIP_STD, np.float32) * 255.0)


def normalize_array(img):
    """uint8 [H, W, 3] -> float32 tensor [3, H, W], CLIP-normalized."""
    x = (np.asarray(img, np.float32) - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(x):
    """float tensor [3, H, W] (CLIP-normalized) -> uint8 numpy [H, W, 3]; for looking at samples."""
    a = x.detach().cpu().float().numpy().transpose(1, 2, 0) / _INV_STD + _MEAN
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def resize_center_crop(img, image_size):
    """PIL image -> RGB PIL image of image_size x image_size."""
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def preprocess(img, image_size):
    """PIL image -> normalized float32 tensor [3, image_size, image_size]."""
    return normalize_array(np.asarray(resize_center_crop(img, image_size)))
