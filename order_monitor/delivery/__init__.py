"""Finishing the order in the application: the outbox relay and the actions.

A written result is half of finishing an order: the application's own
status change (approve; reject and refund) must run too. The write function
records each finished result in an outbox table in the transaction that
writes the row; the leader delivers the entries to the application's API
(an ``http`` action) or as signed Standard Webhooks events (a ``webhook``
action), at least once, each with a stable id, until the application has
taken them. What cannot be delivered becomes a dead letter an operator
lists, re-queues or drops (``order-monitor deliveries``).
"""
