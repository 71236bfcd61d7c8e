"""The integration suite's application and fake-provider fixtures, for the Prometheus test."""

from tests.integration.conftest import app, fake

__all__ = ["app", "fake"]
