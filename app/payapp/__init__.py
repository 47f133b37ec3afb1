"""payapp: the payment service (API, ledger, outbox relay, Kafka consumer) that payctl deploys."""

__version__ = "0.1.0"
