"""longrope-serve's own settings: every option also comes from the environment (``LONGROPE_*``).

vLLM's engine and server options (``--dtype``, ``--max-model-len``, ``--host``, ``--port`` ...) are
parsed by vLLM's own argument parser and passed through; these are the ones longrope-serve adds.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .policy import DEFAULT_POLICY, Policy


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LONGROPE_", extra="ignore")

    model: str | None = Field(None, description="model folder; default: the embedded SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="name clients use in 'model'")
    factors: list[str] = Field(default_factory=list, description="factor files or folders loaded at start")
    registry: str | None = Field(None, description="folder where loaded sets persist across restarts")
    default_reserve: int = Field(256, ge=1, description="generation budget assumed when a request gives no max_tokens")
    policy: Policy = Field(DEFAULT_POLICY, description="upgrade | reserve | pin (see docs/upgrades.md)")
    registry_watch: float = Field(
        2.0, ge=0, description="seconds between checks of the registry for sets loaded by other replicas (0: off)"
    )
    admin_host: str = Field("127.0.0.1", description="interface of the separate admin port")
    admin_port: int | None = Field(None, ge=1, le=65535, description="serve the admin API only on this port")
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin API (off when unset)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (e.g. a mounted secret)")
    host: str | None = None
    port: int | None = None

    def resolved_admin_token(self) -> str | None:
        """The token from the file (preferred) or the variable; None turns the admin API off."""
        if self.admin_token_file is not None:
            try:
                token = self.admin_token_file.read_text().strip()
            except OSError as err:
                raise ValueError(f"cannot read --admin-token-file {self.admin_token_file}: {err.strerror}") from None
            if not token:
                raise ValueError(f"--admin-token-file {self.admin_token_file} is empty")
            return token
        if self.admin_token is not None and self.admin_token.get_secret_value().strip():
            return self.admin_token.get_secret_value().strip()
        return None
