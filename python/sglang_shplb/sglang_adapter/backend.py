"""Registers the `shplb` attention backend with SGLang (filled in by the serve stage)."""


def register_backend() -> None:
    pass
