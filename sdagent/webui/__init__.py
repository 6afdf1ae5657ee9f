"""The supervised WebUI process: launch, readiness, restarts, hangs, memory ceilings."""
