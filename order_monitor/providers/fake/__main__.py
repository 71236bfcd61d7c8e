"""``python -m order_monitor.providers.fake``: serve the fake provider until Ctrl-C."""

from order_monitor.providers.fake.command import main

main()
