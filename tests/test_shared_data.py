"""Data kept outside the repository: a user's clone skips with the reason, CI fails."""

from __future__ import annotations

import pytest

from conftest import shared_data_dir


def test_missing_shared_data_skips_with_the_reason_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-folder.*outside the repository"):
        shared_data_dir("no-such-folder")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        shared_data_dir("no-such-folder")
