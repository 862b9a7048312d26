"""check-config's warnings: placeholders and guessable keys are named, their values never shown."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import pytest

from broker.config import config_warnings, estimated_bits, load_config
from tests.support.config import write_config

# The values the Helm chart ships in values.yaml.
CHART_CLIENT_KEY = "PLACEHOLDER-client-key-for-billing-make-it-random"
CHART_STORE_KEY = "k1 UExBQ0VIT0xERVItc3RvcmUta2V5LTMyLWJ5dGVzISE="
CHART_CLIENT_SECRET = "PLACEHOLDER-twilio-client-secret"
CHART_CLIENT_ID = "PLACEHOLDER-twilio-client-id"


def write(directory: Path, files: dict[str, str], app: dict[str, Any] | None = None) -> Path:
    """A redis-store config reading `files` (name -> content) from `directory`."""
    return write_config(directory, app=app, files=files)


class TestConfigWarnings:
    def test_random_values_get_no_warning(self, tmp_path: Path) -> None:
        """Keys from `secrets` and `openssl rand` pass without a word."""
        assert config_warnings(load_config(write(tmp_path, {}))) == []

    @pytest.mark.parametrize(
        ("files", "app", "key", "fragment"),
        [
            pytest.param(
                {"client.key": CHART_CLIENT_KEY},
                None,
                "clients.billing.key_file",
                "holds a placeholder",
                id="chart-client-key",
            ),
            pytest.param(
                {"store.key": CHART_STORE_KEY},
                None,
                "store.encryption_key_file",
                "line 1 is a placeholder key",
                id="chart-store-key",
            ),
            pytest.param(
                {"app.secret": CHART_CLIENT_SECRET},
                None,
                "apps.twilio.client_secret_file",
                "holds a placeholder",
                id="chart-client-secret",
            ),
            pytest.param(
                {}, {"client_id": CHART_CLIENT_ID}, "apps.twilio.client_id", "placeholder", id="id"
            ),
            pytest.param(
                {"client.key": "k" * 40},
                None,
                "clients.billing.key_file",
                "looks guessable (about 0 bits",
                id="repeated-client-key",
            ),
            pytest.param(
                {"client.key": "ab" * 20},
                None,
                "clients.billing.key_file",
                "looks guessable (about 40 bits",
                id="two-letter-client-key",
            ),
            pytest.param(
                {"store.key": f"k1 {base64.b64encode(bytes(32)).decode()}"},
                None,
                "store.encryption_key_file",
                "line 1 looks guessable",
                id="zero-store-key",
            ),
        ],
    )
    def test_warned(
        self,
        tmp_path: Path,
        files: dict[str, str],
        app: dict[str, Any] | None,
        key: str,
        fragment: str,
    ) -> None:
        """Each placeholder or guessable value is one warning naming its key, not its value."""
        warnings = config_warnings(load_config(write(tmp_path, files, app)))
        assert [w.key for w in warnings] == [key]
        assert fragment in warnings[0].reason
        for value in [*files.values(), *(app or {}).values()]:
            assert value.split()[-1] not in str(warnings[0])

    def test_estimate_separates_random_from_repeated(self) -> None:
        """A random 32-byte key scores far above a repeated one on the entropy estimate."""
        assert estimated_bits(secrets.token_urlsafe(32)) > 150
        assert estimated_bits("ab" * 20) == 40
        assert estimated_bits("") == 0
