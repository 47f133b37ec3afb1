"""payctl: take a payment service from one VM to a gated, replicated multi-node deployment."""

__version__ = "0.1.0"
