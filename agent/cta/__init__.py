"""The Client Task Agent (``python -m agent.cta``): takes wake-ups, pulls
task XML, records every state change, and runs each task in a worker
process through its handler plugin."""
