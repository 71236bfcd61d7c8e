"""An in-repo fake provider: a real HTTP server speaking barakat's and znet's protocols.

For tests, the benchmark and the demo. What it answers is scripted per
reference (:class:`Script`), or by a rule for references without a script;
global knobs (:class:`Behaviour`) add latency, 5xx errors, garbage bodies and
Retry-After responses, drawn from a seeded :class:`random.Random` so a run
can be repeated. Every request is recorded, so a test can assert how often
each reference was asked about.

Protocols (see ``reference/providers.md``):

* barakat: ``GET /client/api/check?orders=[ID1,ID2]`` (``&uuid=1`` optional),
  header ``api-token``; answers ``{"status": "OK", "data": [...]}`` with one
  entry per known id (``order_id``, and ``uuid`` too when ``uuid=1``; ``status``
  wait/accept/reject; ``pin``; ``replay_api``). Unknown ids are left out of
  ``data``. A wrong token is answered 401.
* znet: ``GET /servis/pin_kontrol.php?kod=&sifre=&tahsilat_api_islem_id=``;
  answers ``OK|1| - |{MSG_PENDING}``, ``OK|2|{PIN}|{MSG_DONE}``,
  ``OK|3| - |{reason}``. Errors are ``{code}|{message}`` with HTTP 200, as the
  real panel does: :data:`ZNET_AUTH_ERROR` for wrong credentials,
  :data:`ZNET_NOT_FOUND` for an unknown reference.

Run it alone: ``python -m order_monitor.providers.fake --port 8099``.

``scripts`` holds what it answers, ``server`` the HTTP server, ``command``
the standalone command.
"""

from order_monitor.providers.fake.command import main
from order_monitor.providers.fake.scripts import (
    GARBAGE_BODIES,
    MSG_DONE,
    MSG_FAILED,
    MSG_PENDING,
    ZNET_AUTH_ERROR,
    ZNET_BAD_REQUEST,
    ZNET_NOT_FOUND,
    Answer,
    Behaviour,
    Script,
    always_done,
    default_pin,
    mixture,
)
from order_monitor.providers.fake.server import (
    BARAKAT_PATH,
    ZNET_PATH,
    FakeProvider,
    parse_order_list,
)

__all__ = [
    "BARAKAT_PATH",
    "GARBAGE_BODIES",
    "MSG_DONE",
    "MSG_FAILED",
    "MSG_PENDING",
    "ZNET_AUTH_ERROR",
    "ZNET_BAD_REQUEST",
    "ZNET_NOT_FOUND",
    "ZNET_PATH",
    "Answer",
    "Behaviour",
    "FakeProvider",
    "Script",
    "always_done",
    "default_pin",
    "main",
    "mixture",
    "parse_order_list",
]
