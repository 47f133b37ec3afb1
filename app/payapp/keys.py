"""Typed keys of the application state (``app[PAYMENTS]``), shared by ``payapp.app`` and ``payapp.api``."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from payapp import db
from payapp.auth import ApiKeys
from payapp.codec import Codec
from payapp.metrics import Metrics
from payapp.payments import Payments
from payapp.ratelimit import RateLimiter
from payapp.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
CODEC = web.AppKey("codec", Codec)
METRICS = web.AppKey("metrics", Metrics)
DB_POOL = web.AppKey("db_pool", db.Pool)
REDIS = web.AppKey("redis", aioredis.Redis)
PAYMENTS = web.AppKey("payments", Payments)
API_KEYS = web.AppKey("api_keys", ApiKeys)
LIMITER = web.AppKey("limiter", RateLimiter)
