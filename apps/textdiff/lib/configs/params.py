"""One parser for what a person types: train params (JSON from Slicer, OHIF or curl) and `--conf` values (text).

Both arrive as text or loosely typed JSON; each value is read as the type of its default, and a value that does not
read is a DataError naming it (a 422 from a request, a stopped start for `--conf`).
"""

from __future__ import annotations

import ipaddress
import math

from textdiff.errors import DataError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
MAX_TEXT_CHARS = 200


def parse_value(value: object, default: object, what: str, bounds: tuple[float, float] | None = None,
                choices: tuple[str, ...] | None = None) -> object:
    """`value` as the type of `default`: true/false (also 1/0, yes/no), a whole or a finite number within `bounds`,
    or text (one of `choices` when given)."""
    kind = type(default)
    if kind is bool:
        text = str(value).lower()
        if text not in TRUE + FALSE:
            raise DataError(f"{what} must be true or false, got {value!r:.60}")
        return text in TRUE
    if kind is str:
        if not isinstance(value, str):
            raise DataError(f"{what} must be text, got {value!r:.60}")
        if choices is not None and value not in choices:
            raise DataError(f"{what} must be one of {list(choices)}, got {value!r:.60}")
        return value
    try:
        number = int(str(value)) if kind is int else float(str(value))
    except ValueError:
        raise DataError(f"{what} must be a {'whole number' if kind is int else 'number'}, got {value!r:.60}") from None
    low, high = bounds or (-math.inf, math.inf)
    if not low <= number <= high or math.isnan(number):
        raise DataError(f"{what} must be between {low} and {high}, got {value!r:.60}")
    return number


def trusted_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """`--conf trusted_networks`: comma-separated networks (CIDR) or addresses; DataError naming a bad one."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise DataError(f"--conf trusted_networks: {part!r} is not a network such as 10.0.0.0/8") from None
    return networks
