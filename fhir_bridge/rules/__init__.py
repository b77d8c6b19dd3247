"""Rules and triggers (issue 8): rule files, the measurement ledger, alerts written through the outbox."""
