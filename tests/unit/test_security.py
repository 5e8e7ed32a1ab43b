"""Security settings reach every client, and credentials never reach output."""

from __future__ import annotations

import ssl

import faust

from streamtune.core.settings import Settings
from streamtune.kafka.security import faust_credentials, kafka_client_kwargs, redact_url, redis_kwargs


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    s = Settings(bootstrap_servers="a:9092,b:9092")
    assert kafka_client_kwargs(s) == {"bootstrap_servers": ["a:9092", "b:9092"]}
    assert faust_credentials(s) is None
    assert redis_kwargs(s) == {}


def test_sasl_ssl_reaches_kafka_python_and_faust(tmp_path: object) -> None:
    s = Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc", kafka_sasl_password="pw-123",
    )  # fmt: skip
    kw = kafka_client_kwargs(s)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "svc" and kw["sasl_plain_password"] == "pw-123"
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "svc" and creds.password == "pw-123"
    assert isinstance(creds.ssl_context, ssl.SSLContext)
    assert "pw-123" not in repr(s) and "pw-123" not in str(s.model_dump())


def test_ssl_only_and_redis_tls() -> None:
    s = Settings(
        kafka_security_protocol="SSL", redis_url="rediss://:pw@redis:6380/0", redis_ca_file="/etc/ca.pem"
    )
    assert isinstance(faust_credentials(s), faust.SSLCredentials)
    assert kafka_client_kwargs(s)["security_protocol"] == "SSL"
    assert redis_kwargs(s) == {"ssl_ca_certs": "/etc/ca.pem"}


def test_urls_are_redacted() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
