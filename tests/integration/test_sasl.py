"""Kafka SASL against a real listener: a broker with a SASL_PLAINTEXT (PLAIN) listener, the
scorer, topics admin and replay authenticating through the settings; a wrong password is a
clear start-up error; the password never reaches the logs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from test_e2e import TASKS, all_scored, check_aggregates, expected

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.devtools.demo.replay import replay
from streamtune.devtools.stack import EmbeddedKafka
from streamtune.kafka.topics import ensure_topics
from support import ScorerProcess, settings_env, wait_until

pytestmark = pytest.mark.integration

SECRET = f"planted-{uuid.uuid4().hex}"


@pytest.fixture
def sasl_kafka(tmp_path: Path) -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka(tmp_path / "kafka-sasl", sasl_users={"streamtune": SECRET}) as kafka:
        yield kafka


def test_scorer_authenticates_over_sasl_and_a_wrong_password_is_refused(
    settings: Settings,
    sasl_kafka: EmbeddedKafka,
    redis_client: redis.Redis,
    scorer_factory: Callable[[Settings], ScorerProcess],
) -> None:
    s = settings.replace(
        bootstrap_servers=sasl_kafka.sasl_bootstrap_servers,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="streamtune",
        kafka_sasl_password=SecretStr(SECRET),
    )
    ensure_topics(s)
    outs = expected(s, limit=20, malformed=0.0, seed=17)
    replay(s, TASKS, limit=20, seed=17)
    scorer = scorer_factory(s).start()
    wait_until(all_scored(redis_client, outs), 240, "every event scored over SASL", 0.3, scorer.assert_alive)
    check_aggregates(redis_client, outs)
    assert scorer.stop() == 0
    assert SECRET not in scorer.log()

    wrong = s.replace(kafka_sasl_password=SecretStr("not-the-password"), metrics_port=0)
    done = subprocess.run(
        [sys.executable, "-m", "streamtune.cli", "scorer"],
        env=settings_env(wrong),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    first_error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert first_error and "STREAMTUNE_BOOTSTRAP_SERVERS" in first_error[0], done.stderr[-2000:]
    assert "STREAMTUNE_KAFKA_SASL_PASSWORD" in first_error[0]
    assert "not-the-password" not in done.stderr + done.stdout
