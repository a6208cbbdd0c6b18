"""Decoding raw WebDataset samples; a sample that cannot be used is skipped and counted, never fatal."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

from PIL import Image

from flyt.data.subset import is_uid

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _image(raw: dict):
    data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if data is None:
        return None
    try:
        with warnings.catch_warnings():  # past MAX_IMAGE_PIXELS PIL only warns, then decodes gigabytes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
    except Exception:  # any decoder failure means "undecodable", which pools are full of
        return None


def _text(raw: dict, key: str = "txt") -> str | None:
    data = raw.get(key)
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip() or None  # an empty caption or label says nothing: missing
    except UnicodeDecodeError:
        return None


def decode_pair(raw: dict, skipped: Counter, need_image: bool = True) -> dict | None:
    """An upstream pool sample -> {image, text, uid, key (its pool key)}, or None with the reason counted in ``skipped``."""
    image = _image(raw) if need_image else None
    if need_image and image is None:
        skipped["bad_image"] += 1
        return None
    text = _text(raw)
    if text is None:
        skipped["missing_caption"] += 1
        return None
    try:
        meta = json.loads(raw["json"])
        uid = str(meta["uid"]).lower()
    except Exception:
        meta, uid = {}, ""
    if not is_uid(uid):
        skipped["missing_uid"] += 1
        return None
    return {"image": image, "text": text, "uid": uid, "key": pool_key(meta, raw["__key__"])}


def pool_key(meta: dict, member_key: str) -> str:
    """The img2dataset key of a sample: its json's ``key``, which resharders keep while they rename the tar
    members (DataComp's to ``<uid>-<j>``, flyt's to ``KEY_r``); the member name when the json has none."""
    key = meta.get("key") if isinstance(meta, dict) else None
    return key if isinstance(key, str) and key else member_key


def decode_labelled(raw: dict, skipped: Counter, need_text: bool = False) -> dict | None:
    """A downstream task sample -> {image, label[, text]}; the label is ``cls`` or ``label``."""
    image = _image(raw)
    if image is None:
        skipped["bad_image"] += 1
        return None
    label = _text(raw, "cls") or _text(raw, "label")
    try:
        label = int(label)
    except (TypeError, ValueError):
        skipped["missing_label"] += 1
        return None
    sample = {"image": image, "label": label}
    if need_text:
        text = _text(raw)
        if text is None:
            skipped["missing_caption"] += 1
            return None
        sample["text"] = text
    return sample
