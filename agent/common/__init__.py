"""Mechanisms every part uses: durable files, background threads, loop hand-offs, logs.

Nothing here knows about models, devices or the fleet protocol.
"""
