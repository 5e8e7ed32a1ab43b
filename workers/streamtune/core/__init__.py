"""Core contracts: events, tasks, schemas, decode, session features, errors, settings.

No I/O and no Kafka here; everything else depends on these modules."""
