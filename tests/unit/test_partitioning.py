"""Our partitioner agrees with Kafka's default partitioner (aiokafka's port of the Java client's)."""

from __future__ import annotations

from aiokafka.partitioner import murmur2 as reference_murmur2
from hypothesis import given
from hypothesis import strategies as st

from dp.partitioning import murmur2, partition_for


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=1000))
def test_partition_matches_kafkas_default_partitioner(key: bytes, partitions: int) -> None:
    assert murmur2(key) & 0x7FFFFFFF == reference_murmur2(key) & 0x7FFFFFFF
    assert partition_for(key, partitions) == (reference_murmur2(key) & 0x7FFFFFFF) % partitions


def test_known_java_client_values() -> None:
    # Partitions the Java client gives for these keys with 8 partitions (murmur2 test vectors).
    assert murmur2(b"21") & 0x7FFFFFFF == (-973932308) & 0x7FFFFFFF
    assert murmur2(b"foobar") & 0x7FFFFFFF == (-790332482) & 0x7FFFFFFF
    assert murmur2(b"") & 0x7FFFFFFF == 275646681
