"""The AsyncAPI document as text: JSON, or YAML (block style) without a YAML library."""

from __future__ import annotations

import json
import math
import re
from typing import Any


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def to_yaml(doc: Any) -> str:
    """``doc`` as YAML (block style; every string quoted as JSON does, which YAML reads the same)."""
    lines: list[str] = []
    _yaml(doc, 0, lines)
    return "\n".join(lines) + "\n"


# Characters YAML does not allow as they are (DEL, the C1 controls, NEL among them, surrogates, BOM and the
# non-characters): escaped as \uXXXX, which a double-quoted YAML string reads as JSON does.
_NOT_PRINTABLE = re.compile("[\x7f-\x9f\ud800-\udfff\ufeff\ufffe\uffff]")


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return _NOT_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    if isinstance(value, float):
        return _float(value)
    return json.dumps(value)


def _float(value: float) -> str:
    """A float as YAML 1.1 and 1.2 both read it: with a dot before an exponent (JSON's ``1e-05`` is a string to a
    YAML 1.1 reader such as PyYAML), and infinities and NaN in YAML's spelling."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return text


def _yaml(value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict) and value:
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_scalar(str(key))}:")
                _yaml(item, indent + 2, lines)
            else:
                lines.append(f"{pad}{_scalar(str(key))}: {_inline(item)}")
    elif isinstance(value, list) and value:
        for item in value:
            if isinstance(item, dict | list) and item:
                nested: list[str] = []
                _yaml(item, indent + 2, nested)
                nested[0] = f"{pad}- {nested[0][indent + 2 :]}"  # the item's first line carries the dash
                lines.extend(nested)
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(f"{pad}{_inline(value)}")


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)
