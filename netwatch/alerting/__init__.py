"""Alerts: ``alerts`` turns link and queue events into de-duplicated alert events (pure);
``notify`` delivers them to webhooks."""
