"""The trainer's parts: its options (config), data plan, loss, optimizer and schedules, the two updaters, ranks, logs and status."""
