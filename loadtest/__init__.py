"""The k6 load script (payments.js), shipped inside payctl as package data (see docs/verify.md)."""
