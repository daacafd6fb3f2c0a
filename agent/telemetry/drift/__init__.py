"""agent/telemetry/drift"""
