"""Placeholder until the chat client lands (being written)."""


def register(subparsers) -> None:
    pass
