"""The Kafka layer: the Faust app factory, the faust/aiokafka workarounds (compat), the
offset guard, group offsets, hand-over and drain, topics and connection security."""
