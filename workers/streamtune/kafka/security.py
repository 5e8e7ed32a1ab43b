"""Connection security passed from settings to every client: Kafka SSL/SASL (kafka-python and
Faust) and Redis TLS, plus URL redaction so no credential reaches a log line or an error."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from streamtune.core.settings import Settings


def kafka_client_kwargs(s: Settings) -> dict[str, Any]:
    """Keyword arguments for kafka-python clients (consumer, producer, admin)."""
    kw: dict[str, Any] = {"bootstrap_servers": s.kafka.bootstrap_servers.split(",")}
    if s.security.kafka_protocol == "PLAINTEXT":
        return kw
    kw["security_protocol"] = s.security.kafka_protocol
    if s.security.kafka_ssl_cafile is not None:
        kw["ssl_cafile"] = str(s.security.kafka_ssl_cafile)
    if s.security.kafka_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = s.security.sasl_mechanism
        kw["sasl_plain_username"] = s.security.sasl_username
        kw["sasl_plain_password"] = (
            s.security.sasl_password.get_secret_value() if s.security.sasl_password else ""
        )
    return kw


def _ssl_context(s: Settings) -> ssl.SSLContext:
    cafile = str(s.security.kafka_ssl_cafile) if s.security.kafka_ssl_cafile is not None else None
    return ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=cafile)


def faust_credentials(s: Settings) -> Any:
    """``broker_credentials`` for a Faust app (None for PLAINTEXT)."""
    import faust

    protocol = s.security.kafka_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(_ssl_context(s))
    password = s.security.sasl_password.get_secret_value() if s.security.sasl_password else ""
    context = _ssl_context(s) if protocol == "SASL_SSL" else None
    if s.security.sasl_mechanism.startswith("SCRAM"):
        from faust.auth import SASLMechanism

        mechanism: Any = SASLMechanism(s.security.sasl_mechanism)
    else:
        mechanism = s.security.sasl_mechanism
    return faust.SASLCredentials(
        username=s.security.sasl_username, password=password, ssl_context=context, mechanism=mechanism
    )


def redis_kwargs(s: Settings) -> dict[str, Any]:
    """Extra arguments for ``redis.from_url`` (the CA for ``rediss://`` URLs)."""
    if s.redis.url.startswith("rediss://") and s.security.redis_ca_file is not None:
        return {"ssl_ca_certs": str(s.security.redis_ca_file)}
    return {}


def redact_url(url: str) -> str:
    """``redis://:secret@host/0`` → ``redis://:***@host/0``: safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_client(s: Settings, **kwargs: Any) -> Any:
    """A blocking client for the configured Redis: a single server, or a cluster through one node."""
    import redis
    from redis.cluster import RedisCluster

    factory = RedisCluster.from_url if s.redis.cluster else redis.Redis.from_url
    return factory(s.redis.url, **redis_kwargs(s), **kwargs)


def async_redis_client(s: Settings, **kwargs: Any) -> Any:
    """The asyncio twin of :func:`redis_client` (the scorer's sink)."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    factory = RedisCluster.from_url if s.redis.cluster else aioredis.from_url
    return factory(s.redis.url, **redis_kwargs(s), **kwargs)
