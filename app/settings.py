"""Settings, read from `SIDECAR_*` environment variables and validated once at start. A secret
setting may come from a file instead: `SIDECAR_<NAME>_FILE` names it (Docker and Kubernetes
secrets)."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SIDECAR_"
# The settings that may be read from a file named by SIDECAR_<NAME>_FILE.
SECRET_SETTINGS = ("database_url", "token_keys", "appservice_token", "admin_token")


class _SecretFiles(PydanticBaseSettingsSource):
    """`SIDECAR_<NAME>_FILE=path`: the secret setting NAME is the file's text, without its trailing
    newline. Setting both the variable and its file is an error, not a silent choice."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        environ = {key.upper(): value for key, value in os.environ.items()}
        values: dict[str, Any] = {}
        for name in SECRET_SETTINGS:
            if name not in self.settings_cls.model_fields:
                continue
            var = ENV_PREFIX + name.upper()
            path = environ.get(var + "_FILE")
            if path is None:
                continue
            if var in environ:
                raise SettingsError(
                    f"invalid settings:\n  {var} and {var}_FILE are both set; set one"
                )
            try:
                values[name] = Path(path).read_text().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise SettingsError(
                    f"invalid settings:\n  {var}_FILE: cannot read {path} ({reason})"
                ) from None
        return values


class DatabaseSettings(BaseSettings):
    """The database alone: all `migrate` needs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = Field(
        description="PostgreSQL URL, e.g. postgresql://user:pass@host:5432/db",
        repr=False,  # it may carry the password
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _SecretFiles(settings_cls))

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, value: str) -> str:
        for prefix in ("postgresql://", "postgres://", "postgresql+asyncpg://"):
            if value.startswith(prefix):
                return "postgresql+asyncpg://" + value[len(prefix) :]
        raise ValueError("must start with postgresql:// (or postgresql+asyncpg://)")


class Settings(DatabaseSettings):
    """Every setting of the sidecar. docs/deploy.md lists them with their defaults."""

    homeserver_url: str = Field(
        description="The homeserver's client-server API, as the sidecar reaches it directly",
    )
    token_keys: Annotated[list[bytes], NoDecode] = Field(
        description="Comma-separated base64 32-byte keys for tokens at rest; the first encrypts",
        repr=False,
    )
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8009, ge=1, le=65535)

    max_delay_ms: int = Field(default=86_400_000, ge=1)
    max_scheduled_per_user: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=65_536, ge=1024)

    whoami_cache_seconds: float = Field(default=60.0, ge=0)
    # whoami calls under way at once for tokens not yet known; a request needing one more is
    # answered 429 at once. A refused token is remembered as refused this long.
    whoami_max_concurrent: int = Field(default=20, ge=1)
    whoami_refusal_cache_seconds: float = Field(default=5.0, ge=0)
    homeserver_timeout_seconds: float = Field(default=10.0, gt=0)
    sweep_interval_seconds: float = Field(default=15.0, gt=0)
    # A claim's lease is renewed every third of it while its replica lives; it runs out only for
    # a replica that stalls or holds no lock (`app.liveness`): a dead replica's claims are free
    # once a peer's check (every `liveness_check_seconds`) sees its lock gone.
    claim_lease_seconds: float = Field(default=30.0, gt=0)
    liveness_check_seconds: float = Field(default=1.0, gt=0)
    # After SIGTERM: how long a replica goes on serving, with `/ready` answering 503, before it
    # stops accepting connections (docs/reliability.md, "Drain").
    drain_seconds: float = Field(default=5.0, ge=0)
    retry_window_seconds: float = Field(default=3600.0, gt=0)
    retry_max_backoff_seconds: float = Field(default=60.0, gt=0)
    replay_concurrency: int = Field(default=16, ge=1, le=256)
    # How many claimed events one replica holds at most (queued, being sent, or sent with the
    # outcome not yet written); the rest stay free for other replicas.
    replay_max_claimed: int = Field(default=200, ge=1)

    finalised_retention_days: float = Field(default=7.0, gt=0)
    finalised_max_per_user: int = Field(default=1000, ge=0)
    prune_interval_seconds: float = Field(default=600.0, gt=0)

    cancel_on_newer_state: bool = True

    # Rate limits (requests a second, and burst); 0 turns one off. Sized so that MatrixRTC's
    # heartbeat (a restart every 5 s per device, plus the SFU's) never comes near them.
    ratelimit_schedule_per_second: float = Field(default=10.0, ge=0)
    ratelimit_schedule_burst: int = Field(default=200, ge=1)
    ratelimit_manage_per_second: float = Field(default=20.0, ge=0)
    ratelimit_manage_burst: int = Field(default=200, ge=1)
    ratelimit_tokenless_per_second: float = Field(default=2.0, ge=0)
    ratelimit_tokenless_burst: int = Field(default=20, ge=1)
    # Shared by every call without a token on a delay_id issued before ids carried a tag. Each
    # one that passes costs a database lookup, so the burst stays small: a flood of random ids
    # of that form gets no more than a handful of lookups at once.
    ratelimit_untagged_per_second: float = Field(default=100.0, ge=0)
    ratelimit_untagged_burst: int = Field(default=10, ge=1)

    # Application-service mode: replay as the user through the homeserver's application-service
    # API instead of with the user's own (possibly expired) access token.
    appservice_token: SecretStr | None = None
    # The operators' admin API (`/_sidecar/admin/v1/`, app/api/admin.py): off while unset.
    admin_token: SecretStr | None = None

    log_level: str = "INFO"
    # `text` (one readable line) or `json` (one JSON object a line, for log collectors).
    log_format: str = "text"
    database_pool_size: int = Field(default=10, ge=1)

    @field_validator("homeserver_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("token_keys", mode="before")
    @classmethod
    def _decode_keys(cls, value: object) -> list[bytes]:
        if isinstance(value, list) and all(isinstance(k, bytes) for k in value):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be one or more comma-separated keys (python -m app gen-key)")
        keys = []
        for part in value.split(","):
            try:
                key = base64.urlsafe_b64decode(part.strip() + "=" * (-len(part.strip()) % 4))
            except (binascii.Error, ValueError):
                raise ValueError(
                    "each key must be base64 (python -m app gen-key makes one)"
                ) from None
            if len(key) != 32:
                raise ValueError("each key must decode to 32 bytes (python -m app gen-key)")
            keys.append(key)
        return keys

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        # A bearer token as it can stand in a header; short ones could be guessed.
        if len(token) < 32 or not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError(
                "must be at least 32 printable ASCII characters without spaces"
                " (python -m app gen-key makes one)"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        kind = value.lower()
        if kind not in {"text", "json"}:
            raise ValueError("must be text or json")
        return kind


class SettingsError(Exception):
    """The environment does not describe a valid configuration; the message says what to fix."""


_Kind = TypeVar("_Kind", bound=DatabaseSettings)


def load_settings() -> Settings:
    """Read the environment, turning pydantic's report into one line per wrong setting."""
    return _load(Settings)


def load_database_settings() -> DatabaseSettings:
    """The database setting alone (`migrate`), reported like load_settings()."""
    return _load(DatabaseSettings)


def _load(kind: type[_Kind]) -> _Kind:
    try:
        return kind()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else ENV_PREFIX
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                message = "is required"
            lines.append(f"  {name}: {message}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
