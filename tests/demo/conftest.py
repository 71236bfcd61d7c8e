"""The integration suite's application and fake-provider fixtures, for the tests here."""

from tests.integration.conftest import app, fake

__all__ = ["app", "fake"]
