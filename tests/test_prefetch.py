"""The one background-prefetch helper: order kept, errors raised in the consumer, early stop closes the producer."""

import pytest

from litpipe.prefetch import prefetched


def test_items_arrive_in_order():
    assert list(prefetched(range(100), 3, "t")) == list(range(100))


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in prefetched(items(), 2, "t"):
            got.append(item)
    assert got == [1]


def test_stopping_early_closes_the_producer():
    closed = []

    def items():
        try:
            yield from range(1000)
        finally:
            closed.append(True)

    stream = prefetched(items(), 2, "t")
    assert next(stream) == 0
    stream.close()
    assert closed == [True]
