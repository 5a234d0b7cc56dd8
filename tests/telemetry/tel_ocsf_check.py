"""Checks an OCSF object against the shipped OCSF 1.8.0 subset (tests/data/ocsf/ocsf-1.8.0-subset.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent.parent / "data" / "ocsf" / "ocsf-1.8.0-subset.json"


@cache
def schema() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def ocsf_errors(ev: dict[str, Any]) -> list[str]:
    """Every way `ev` breaks the 1.8.0 class definition: unknown keys at any level, missing required
    attributes, invalid enum ids or captions, a wrong type_uid/type_name, wrong value types."""
    s = schema()
    errs: list[str] = []
    cls = s["classes"].get(str(ev.get("class_uid")))
    if cls is None:
        return [f"class_uid {ev.get('class_uid')!r} not in the subset"]
    allowed = set(s["base_attributes"]) | set(cls["attributes"])
    for attrs in s["profile_attributes"].values():
        allowed |= set(attrs)
    errs += [f"unknown attribute {k!r}" for k in ev if k not in allowed]
    errs += [f"missing required {k!r}" for k in s["required"] if k not in ev]
    for group in cls["at_least_one"]:
        if not any(k in ev for k in group):
            errs.append(f"needs at least one of {group}")
    if ev.get("class_name") != cls["name"]:
        errs.append(f"class_name {ev.get('class_name')!r} != {cls['name']!r}")
    if ev.get("category_uid") != cls["category_uid"]:
        errs.append("category_uid")
    if ev.get("category_name") != s["categories"][str(cls["category_uid"])]:
        errs.append("category_name")
    act = str(ev.get("activity_id"))
    if act not in cls["activity_id"]:
        errs.append(f"activity_id {act} not in enum")
    elif act != "99" and ev.get("activity_name") != cls["activity_id"][act]:
        errs.append(f"activity_name {ev.get('activity_name')!r} != {cls['activity_id'][act]!r}")
    if ev.get("type_uid") != ev.get("class_uid", 0) * 100 + int(ev.get("activity_id", -1)):
        errs.append(f"type_uid {ev.get('type_uid')} != class_uid*100+activity_id")
    if ev.get("type_name") != f"{cls['name']}: {ev.get('activity_name')}":
        errs.append(f"type_name {ev.get('type_name')!r}")
    for key, enum in s["enums"].items():
        if key in ev:
            v = str(ev[key])
            caption_key = s["enum_captions"][key]
            if v not in enum:
                errs.append(f"{key} {v} not in enum")
            elif v != "99" and caption_key in ev and ev[caption_key] != enum[v]:
                errs.append(f"{caption_key} {ev[caption_key]!r} != {enum[v]!r}")
            elif v == "99" and not ev.get(caption_key):
                errs.append(f"{key}=99 needs a source-specific {caption_key}")
    meta = ev.get("metadata", {})
    if meta.get("version") != s["version"]:
        errs.append(f"metadata.version {meta.get('version')!r}")
    for p in meta.get("profiles", []):
        if p not in s["profiles"]:
            errs.append(f"unknown profile {p!r}")
    for k, v in ev.items():
        errs += _check_attr(k, v, "")
    return errs


def _check_attr(key: str, value: Any, where: str) -> list[str]:
    s = schema()
    path = f"{where}{key}"
    errs = _type_errors(key, value, path)
    kind = s["attribute_objects"].get(key)
    if kind is None or kind == "*":
        return errs
    if kind.endswith("[]"):
        if not isinstance(value, list):
            return [*errs, f"{path}: expected an array"]
        for i, item in enumerate(value):
            errs += _check_object(kind[:-2], item, f"{path}[{i}]")
        return errs
    return errs + _check_object(kind, value, path)


def _check_object(kind: str, obj: Any, path: str) -> list[str]:
    spec = schema()["objects"].get(kind)
    if spec is None:
        return [f"{path}: object {kind!r} not in the subset"]
    if not isinstance(obj, dict):
        return [f"{path}: expected an object"]
    errs = [f"{path}: unknown attribute {k!r}" for k in obj if k not in spec["attributes"]]
    errs += [f"{path}: missing required {k!r}" for k in spec["required"] if k not in obj]
    for group in spec.get("at_least_one", []):
        if not any(k in obj for k in group):
            errs.append(f"{path}: needs at least one of {group}")
    for k, v in obj.items():
        errs += _check_attr(k, v, path + ".")
    return errs


def _type_errors(key: str, value: Any, path: str) -> list[str]:
    t = schema()["types"]
    if key in t["integer"] and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: expected integer, got {value!r}"]
    if key in t["string"] and not isinstance(value, str):
        return [f"{path}: expected string, got {value!r}"]
    if key in t["string_array"] and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
        return [f"{path}: expected array of strings"]
    if key in t["boolean"] and not isinstance(value, bool):
        return [f"{path}: expected boolean"]
    return []
