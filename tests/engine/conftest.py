"""The integration suite's application and fake-provider fixtures, for the engine's own tests."""

from tests.integration.conftest import app, fake

__all__ = ["app", "fake"]
