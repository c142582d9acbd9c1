"""ctdataloader: owns the durable status outbox and uploads it to the task server."""
