"""`python -m xllm.server.openapi [FILE]`: write the app's OpenAPI schema as YAML (openapi.yaml)."""

from __future__ import annotations

import sys

import yaml

from xllm.server.app import create_app
from xllm.server.settings import Settings


def openapi_yaml() -> str:
    schema = create_app(Settings()).openapi()
    return yaml.safe_dump(schema, sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    text = openapi_yaml()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
