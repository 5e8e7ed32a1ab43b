"""Nested settings read from the same flat ``STREAMTUNE_*`` variables and flat keyword arguments."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from streamtune.core.settings import (
    FLAT_FIELDS,
    GROUPS,
    Settings,
    env_name,
    env_name_for_loc,
)
from streamtune.devtools.workers import settings_env

SPECIAL: dict[str, Any] = {
    "backend": "torch",
    "task_backends": {"query_class": "torch-bf16"},
    "task_batch_max_events": {"query_class": 256},
    "task_model_batch_size": {"review_sentiment": 16},
    "trainer_release_stage": "live",
    "log_level": "DEBUG",
    "lib_log_level": "ERROR",
}


def _sample(flat: str) -> Any:
    """A valid value of ``flat`` that differs from its default."""
    if flat in SPECIAL:
        return SPECIAL[flat]
    field = Settings.flat_field(flat)
    ann = field.annotation
    default = field.get_default(call_default_factory=True)
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return next(a for a in args if a != default)
    if type(None) in args:  # X | None, unset by default
        (inner,) = (a for a in args if a is not type(None))
        return SecretStr(f"secret-{flat}") if inner is SecretStr else Path(f"/tmp/st/{flat}")
    if ann is bool:
        return not default
    if ann is int:
        return default + 1
    if ann is float:
        return default / 2 if default > 0 else 0.5
    if ann is Path:
        return Path(f"/tmp/st/{flat}")
    if ann is str:
        return f"x-{flat}"
    raise AssertionError(f"{flat}: no sample for {ann}")


SAMPLE = {flat: _sample(flat) for flat in FLAT_FIELDS}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.upper().startswith("STREAMTUNE_"):
            monkeypatch.delenv(k)


def _nested(s: Settings, flat: str) -> Any:
    group, attr = FLAT_FIELDS[flat]
    return getattr(getattr(s, group), attr)


def _streamtune_env(s: Settings) -> dict[str, str]:
    return {k: v for k, v in settings_env(s).items() if k.startswith("STREAMTUNE_")}


def test_table_covers_every_group_field_exactly_once() -> None:
    targets = list(FLAT_FIELDS.values())
    assert len(targets) == len(set(targets)), "two flat names point at one attribute"
    fields = {(g, a) for g, cls in GROUPS.items() for a in cls.model_fields}
    assert set(targets) == fields
    assert set(Settings.model_fields) == set(GROUPS)
    assert not set(FLAT_FIELDS) & set(GROUPS), "a flat name must not shadow a group"
    assert [n for n, _ in Settings.flat_fields()] == list(FLAT_FIELDS)
    assert Settings.env_names() == {f"STREAMTUNE_{n.upper()}" for n in FLAT_FIELDS}


def test_samples_differ_from_the_defaults() -> None:
    default = Settings()
    for flat, value in SAMPLE.items():
        assert default.flat_get(flat) != value, flat


@pytest.mark.parametrize("flat", list(FLAT_FIELDS))
def test_a_flat_variable_lands_in_its_group(flat: str, monkeypatch: pytest.MonkeyPatch) -> None:
    want = Settings(**{flat: SAMPLE[flat]})
    name = env_name(flat)
    monkeypatch.setenv(name, _streamtune_env(want)[name])
    s = Settings()
    assert _nested(s, flat) == SAMPLE[flat]
    assert s == Settings().replace(**{flat: SAMPLE[flat]})
    others = [f for f in FLAT_FIELDS if f != flat]
    assert all(s.flat_get(f) == Settings().flat_get(f) for f in others if f != "base_model")


def test_every_setting_round_trips_through_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(**SAMPLE)
    env = _streamtune_env(s)
    assert set(env) == Settings.env_names()  # every sample is set, secrets included
    assert env["STREAMTUNE_KAFKA_SASL_PASSWORD"] == "secret-kafka_sasl_password"
    assert env["STREAMTUNE_TASK_BACKENDS"] == '{"query_class": "torch-bf16"}'
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert Settings() == s
    assert Settings().flat_dict() == SAMPLE


def test_unset_values_stay_unset_in_the_worker_environment() -> None:
    env = _streamtune_env(Settings())
    assert "STREAMTUNE_KAFKA_SASL_PASSWORD" not in env and "STREAMTUNE_MANIFEST_HMAC_KEY" not in env
    assert env["STREAMTUNE_SHADOW"] == "true" and env["STREAMTUNE_TASK_BACKENDS"] == "{}"


def test_flat_keyword_arguments() -> None:
    s = Settings(bootstrap_servers="a:9092,b:9092", trainer_lr=1e-3, kafka_sasl_password="pw", state_dir="/x")
    assert s.kafka.bootstrap_servers == "a:9092,b:9092"
    assert s.trainer.lr == 1e-3
    assert s.security.sasl_password == SecretStr("pw")
    assert s.ops.state_dir == Path("/x")
    assert Settings(**s.flat_dict()) == s


def test_nested_keyword_arguments_and_flat_ones_win() -> None:
    s = Settings(trainer={"lr": 0.1, "seed": 3}, trainer_lr=0.2)
    assert (s.trainer.lr, s.trainer.seed) == (0.2, 3)
    t = Settings(trainer=s.trainer, trainer_epochs=5)
    assert (t.trainer.lr, t.trainer.epochs, t.trainer.seed) == (0.2, 5, 3)
    with pytest.raises(ValidationError):
        Settings(trainer={"trainer_lr": 0.1})  # inside a group only its attributes


def test_keyword_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMTUNE_TRAINER_LR", "0.5")
    monkeypatch.setenv("STREAMTUNE_TRAINER_SEED", "7")
    s = Settings(trainer_lr=0.25)
    assert (s.trainer.lr, s.trainer.seed) == (0.25, 7)
    s = Settings(trainer={"lr": 0.125})
    assert (s.trainer.lr, s.trainer.seed) == (0.125, 7)


def test_unknown_variables_and_arguments_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMTUNE_NOT_A_SETTING", "1")
    monkeypatch.setenv("STREAMTUNE_TRAINER", '{"lr": 9}')  # a group is not a variable
    monkeypatch.setenv("STREAMTUNE_TRAINER__LR", "9")
    assert Settings() == Settings.model_validate({})
    assert Settings(not_a_setting=1) == Settings()


def test_json_and_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMTUNE_TASK_BACKENDS", '{"query_class": "torch"}')
    monkeypatch.setenv("STREAMTUNE_TASK_BATCH_MAX_EVENTS", '{"purchase_intent": 64}')
    monkeypatch.setenv("STREAMTUNE_MANIFEST_HMAC_KEY", "k3y")
    monkeypatch.setenv("STREAMTUNE_LOG_LEVEL", "debug")
    s = Settings()
    assert s.model.task_backends == {"query_class": "torch"}
    assert s.backend_for("query_class") == "torch" and s.backend_for("review_sentiment") == "onnx-fp32"
    assert s.batch_max_events_for("purchase_intent") == 64 and s.batch_max_events_for("query_class") == 32
    assert s.security.manifest_hmac_key is not None
    assert s.security.manifest_hmac_key.get_secret_value() == "k3y"
    assert s.ops.log_level == "DEBUG"
    monkeypatch.setenv("STREAMTUNE_TASK_BACKENDS", "{not json")
    with pytest.raises(SettingsError, match="STREAMTUNE_TASK_BACKENDS"):
        Settings()
    monkeypatch.setenv("STREAMTUNE_TASK_BACKENDS", '{"purchase_intent": "onnx-int8"}')
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"trainer_lr": -1}, ("trainer", "lr")),
        ({"backend": "tensorrt"}, ("model", "backend")),
        ({"task_backends": {"purchase_intent": "torch"}}, ("model", "task_backends")),
        ({"task_model_batch_size": {"nope": 3}}, ("scorer", "task_model_batch_size")),
        ({"trainer_release_stage": "later"}, ("trainer", "release_stage")),
        ({"kafka_session_timeout_s": 1}, ("kafka", "session_timeout_s")),
        ({"kafka_security_protocol": "TLS"}, ("security", "kafka_protocol")),
    ],
)
def test_replace_revalidates(change: dict[str, Any], loc: tuple[str, str]) -> None:
    with pytest.raises(ValidationError) as e:
        Settings().replace(**change)
    assert e.value.errors()[0]["loc"] == loc
    assert env_name_for_loc(loc) == env_name(next(iter(change)))


def test_replace_copies_by_flat_name_and_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Settings(trainer_lr=0.3, manifest_hmac_key="k")
    monkeypatch.setenv("STREAMTUNE_TRAINER_LR", "0.9")
    s = base.replace(metrics_port=0, adapter_dir="/a", log_level="warning")
    assert (s.ops.metrics_port, s.model.adapter_dir, s.ops.log_level) == (0, Path("/a"), "WARNING")
    assert s.trainer.lr == 0.3 and s.security.manifest_hmac_key == SecretStr("k")
    assert base.ops.metrics_port == 9108  # the original is untouched
    with pytest.raises(TypeError, match="lr"):
        base.replace(lr=0.1)


def test_groups_and_root_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.trainer.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.trainer = s.trainer  # type: ignore[misc]


def test_secrets_never_in_repr() -> None:
    s = Settings(kafka_sasl_password="hunter2", manifest_hmac_key="k3y-v4lue")
    for text in (repr(s), str(s), repr(s.security), repr(list(s.flat_items())), s.model_dump_json()):
        assert "hunter2" not in text and "k3y-v4lue" not in text
    assert _streamtune_env(s)["STREAMTUNE_KAFKA_SASL_PASSWORD"] == "hunter2"


def test_helpers_on_the_root_and_the_groups() -> None:
    s = Settings(
        topic_prefix="t1.", backend="onnx-int8", model_batch_size=8, task_model_batch_size={"query_class": 4}
    )
    assert s.topic("events.review") == s.kafka.topic("events.review") == "t1.events.review"
    assert s.backend_for("purchase_intent") == "onnx-fp32"  # follows the text tasks into ONNX Runtime
    assert s.model_batch_size_for("query_class") == 4 and s.model_batch_size_for("review_sentiment") == 8


def test_error_locations_name_the_variable() -> None:
    assert env_name_for_loc(("trainer", "lr")) == "STREAMTUNE_TRAINER_LR"
    assert env_name_for_loc(("security", "kafka_protocol")) == "STREAMTUNE_KAFKA_SECURITY_PROTOCOL"
    assert env_name_for_loc(("redis", "url")) == "STREAMTUNE_REDIS_URL"
    assert env_name_for_loc(()) == "settings"


def test_model_copy_refuses_flat_names_that_would_be_set_beside_the_groups() -> None:
    s = Settings()
    flat = {"trainer_group_id": "x"}  # a variable: scripts/nest_settings_callsites.py leaves it alone
    with pytest.raises(TypeError, match="replace"):
        s.model_copy(update=flat)
    assert s.replace(trainer_group_id="x").trainer.group_id == "x"
    assert s.model_copy(update={"ops": s.ops}).ops == s.ops  # group-level updates still work
