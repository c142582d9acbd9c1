"""What operators run: the ``dsagent`` command line and its commands
(doctor, status, logs, trace, enroll, new-handler, run-task)."""
