"""Load-time head permutation hook (filled in by the place stage)."""


def register_weight_hook() -> None:
    pass
