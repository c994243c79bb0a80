"""The words of a skip record that more than one stage reads: the read tasks and the store write
them, reports count them. No imports, so read tasks and the store can share it."""

DUPLICATE_KEY = "duplicate key"


def duplicate_reason(first_input: str) -> str:
    """The one rule for repeated keys, in a shard and across shards: the first in input order is
    kept, each later one is skipped with this reason."""
    return f"{DUPLICATE_KEY}: first in {first_input}"


def reason_kind(reason: str) -> str:
    """What reports count a skip reason by: the words before its colon ("decompression bomb")."""
    return reason.split(":")[0]
