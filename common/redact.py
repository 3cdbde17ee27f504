"""Secret values of the environment kept out of messages: an error from the object store or a failed upload may
quote a signed request or the credentials it used, and such a message ends up in logs and terminals."""

from __future__ import annotations

import os

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SSLFER_STORE_SECRET_KEY")
MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words of the message


def redact(text: str) -> str:
    """``text`` with every secret value of the environment replaced by ``***``."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= MIN_SECRET_LEN:
            text = text.replace(value, "***")
    return text
