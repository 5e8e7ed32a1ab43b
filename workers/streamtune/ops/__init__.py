"""Operations: Prometheus metrics, readiness and structured logging."""
