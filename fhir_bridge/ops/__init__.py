"""Operations: health and readiness, metrics, structured logs."""
