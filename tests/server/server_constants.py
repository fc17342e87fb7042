"""Settings of the servers that tests/server/conftest.py starts, for the tests that depend on them."""

RETRIEVE_K = 30  # the retrieval depth the test repositories are built with: recommend's k is at most this
MAX_QUEUE_DELAY_US = 20_000  # dynamic batching waits up to 20 ms, so concurrent requests share batches
