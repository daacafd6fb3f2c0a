"""The service manager's side: systemd notifications and the watchdog."""
