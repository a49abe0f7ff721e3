"""The replication engine: the daemon, mirrorfs capture, the change journal and the applier."""
