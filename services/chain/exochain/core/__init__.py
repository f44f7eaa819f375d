"""The replication core: sans-IO state machines (no sockets, no sleeps, no wall clock inside).

Inputs are peer messages, appends and ticks, each with the current time `now_ns`; outputs are
messages to send (`Outgoing`) and events for subscribers. Storage is written before any message
that depends on it is returned, so a crash never announces what was not persisted.
"""
