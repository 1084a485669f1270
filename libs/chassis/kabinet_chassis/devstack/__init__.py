"""The embedded development stack: PostgreSQL and a Kafka-protocol broker from wheels."""
